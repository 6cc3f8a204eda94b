"""Data pipeline throughput: scan, sample loading, and the latent cache cold vs hot. Prints a markdown table.

    python scripts/bench_data.py [--images 48] [--size 1024x768] [--resolution 512] [--threads 1]

Images are generated (smooth random colour fields saved as JPEG) in a temporary folder. The VAE is the tiny
SDXL VAE of `sdtrain.models.tiny` (random weights), so the cache rows measure the cache and pixel pipeline,
not a real VAE.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtrain.data.buckets import Bucketing
from sdtrain.data.cache import LatentCache, vae_fingerprint
from sdtrain.data.dataset import PlannedBatches, SubsetSpec, latent_items, latent_pixels, scan_dataset
from sdtrain.data.loader import load_sample


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    for index in range(count):
        # vary the aspect ratio so several buckets are used
        w, h = (width, height) if index % 3 else (height, width)
        coarse = rng.integers(0, 255, (h // 64 + 1, w // 64 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        image.save(folder / f"img{index:04d}.jpg", quality=90)
        (folder / f"img{index:04d}.txt").write_text(f"image number {index}")


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", default="1024x768", help="WxH of the generated images")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads and scan workers")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.lower().split("x"))

    from sdtrain.models.tiny import build_tiny_pipeline

    vae = build_tiny_pipeline("sdxl", seed=0).vae.eval()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        make_images(root / "data", args.images, size)
        bucketing = Bucketing(args.resolution)
        dataset, seconds = timed(lambda: scan_dataset([SubsetSpec(root / "data")], bucketing, args.threads))
        rows.append(("scan (read + sha256 + full decode + bucket)", args.images, seconds))

        keys = [key for batch in PlannedBatches(dataset.records, args.batch_size, 0, 0) for key in batch]
        _, seconds = timed(lambda: [load_sample(dataset, key, seed=0) for key in keys])
        rows.append(("sample: load + resize + crop + to tensor (1 process)", len(keys), seconds))

        items = latent_items(dataset)
        cache = LatentCache(root / "cache", vae_fingerprint(vae))

        def encode(batch):
            with torch.no_grad():
                return vae.encode(torch.stack([latent_pixels(item) for item in batch])).latent_dist.mean

        encoded, seconds = timed(lambda: cache.ensure(items, encode, batch_size=args.batch_size))
        rows.append((f"latent cache cold (load + tiny VAE encode + write), {encoded} encoded", len(items), seconds))
        encoded, seconds = timed(lambda: cache.ensure(items, encode, batch_size=args.batch_size))
        rows.append((f"latent cache hot (check entries), {encoded} encoded", len(items), seconds))
        _, seconds = timed(lambda: [load_sample(dataset, key, seed=0, latent_cache=cache) for key in keys])
        rows.append(("sample from latent cache (read safetensors)", len(keys), seconds))

    print(f"{args.images} generated {size[0]}x{size[1]} JPEGs, resolution {args.resolution}, "
          f"{args.threads} thread(s), {os.cpu_count()} CPUs ({platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f} at the end, torch {torch.__version__}\n")
    print("| stage | images | seconds | images/s |")
    print("|---|---:|---:|---:|")
    for name, count, seconds in rows:
        print(f"| {name} | {count} | {seconds:.2f} | {count / seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
