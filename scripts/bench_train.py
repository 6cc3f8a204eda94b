"""Training step time: DoRA vs plain LoRA at the same rank, measured side by side in one run.

Builds the trainers on the tiny SDXL model (the real training loop: cached latents, text encoding, UNet
forward/backward, 8-bit AdamW step) and times their optimizer steps interleaved (LoRA, DoRA, DoRA with per-layer
norms, LoRA, ...), so machine noise hits all alike. "dora-per-layer" is DoRA with the batched channel norms of
sdtrain.adapters.norm_batch switched off (each layer computes its own norm). Each resolution is one such
side-by-side run. Prints a markdown table with the median step times and the ratios to LoRA.

    python scripts/bench_train.py --steps 20 --warmup 3 --resolution 128 256 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_trainer(kind: str, args, work: Path):
    from sdtrain.config import load_config
    from sdtrain.train.loop import Trainer

    overrides = [
        "model.path=builtin:tiny-sdxl",
        f"data.resolution={args.resolution}", "data.min_bucket_side=64", "data.max_bucket_side=512",
        f"data.cache_dir={work / 'cache'}",
        f"network.type={kind}", f"network.rank={args.rank}", f"network.preset={args.preset}",
        f"network.train_text_encoder={str(args.text_encoder).lower()}",
        f"optimizer.type={args.optimizer}", "optimizer.lr=1e-4",
        f"train.batch_size={args.batch}", "train.max_steps=100000", "train.mixed_precision=no",
        f"train.output_dir={work / kind}", "log.tensorboard=false", "save.verify_targets=[]",
    ]
    cfg = load_config(ROOT / "configs" / "demo.toml", overrides)
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    return trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, nargs="+", default=[128])
    parser.add_argument("--preset", default="attn-mlp", choices=["attn", "attn-mlp", "full"])
    parser.add_argument("--optimizer", default="AdamW8bit")
    parser.add_argument("--text-encoder", action="store_true", help="also train text-encoder adapters")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    kinds = ("lora", "dora", "dora-per-layer")
    rows = []
    for resolution in args.resolution:
        run_args = argparse.Namespace(**{**vars(args), "resolution": resolution})
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            trainers = {kind: make_trainer(kind.split("-")[0], run_args, work / kind) for kind in kinds}
            for module in trainers["dora-per-layer"].adapters.modules.values():
                module._norm_batch = None
            times = {kind: [] for kind in trainers}
            for step in range(args.warmup + args.steps):
                for kind, trainer in trainers.items():
                    start = time.perf_counter()
                    trainer.optimizer_step(step)
                    elapsed = time.perf_counter() - start
                    if step >= args.warmup:
                        times[kind].append(elapsed)
        median = {kind: statistics.median(values) * 1000 for kind, values in times.items()}
        rows.append((resolution, median))
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"tiny SDXL, batch {args.batch}, rank {args.rank}, preset {args.preset}, {args.optimizer}, "
          f"text encoders {'on' if args.text_encoder else 'off'}, {device}; "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up")
    print()
    print("| resolution | " + " | ".join(f"{k} (ms)" for k in kinds) + " | dora / lora | dora-per-layer / lora |")
    print("|---:|" + "---:|" * (len(kinds) + 2))
    for resolution, median in rows:
        cells = " | ".join(f"{median[k]:.1f}" for k in kinds)
        print(f"| {resolution} px | {cells} | {median['dora'] / median['lora']:.3f} | "
              f"{median['dora-per-layer'] / median['lora']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
