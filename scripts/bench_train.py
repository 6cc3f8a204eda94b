"""Training step time: DoRA vs plain LoRA at the same rank, measured side by side in one run.

Builds the trainers on the tiny SDXL model (the real training loop: cached latents, text encoding, UNet
forward/backward, 8-bit AdamW step) and times their optimizer steps interleaved (LoRA, DoRA, DoRA with per-layer
norms, LoRA, ...), so machine noise hits all alike. "dora-per-layer" is DoRA with the batched channel norms of
sdtrain.adapters.norm_batch switched off (each layer computes its own norm). Each resolution is one such
side-by-side run; `--runs N` repeats it with fresh trainers (the machine's speed drifts, and the ratio with it)
and reports the median ratio with the range. Prints a markdown table with the median step times and the ratios
to LoRA.

    python scripts/bench_train.py --steps 20 --warmup 3 --resolution 128 256 512 --runs 3
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
        f"train.output_dir={work / kind}", "log.tensorboard=false", "save.targets=[]",
    ]
    cfg = load_config(ROOT / "configs" / "demo.toml", overrides)
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    return trainer


def side_by_side(kinds, args) -> dict[str, float]:
    """Median step time (ms) of each kind, their steps interleaved in one process."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trainers = {kind: make_trainer(kind.split("-")[0], args, work / kind) for kind in kinds}
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
    return {kind: statistics.median(values) * 1000 for kind, values in times.items()}


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
    parser.add_argument("--runs", type=int, default=1, help="repeat each resolution's side-by-side run this often")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    kinds = ("lora", "dora", "dora-per-layer")
    rows = []
    for resolution in args.resolution:
        run_args = argparse.Namespace(**{**vars(args), "resolution": resolution})
        runs = [side_by_side(kinds, run_args) for _ in range(max(1, args.runs))]
        rows.append((resolution, runs))
    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"tiny SDXL, batch {args.batch}, rank {args.rank}, preset {args.preset}, {args.optimizer}, "
          f"text encoders {'on' if args.text_encoder else 'off'}, {device}; "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up"
          + (f"; {args.runs} runs per resolution (times: the run with the median DoRA / LoRA ratio)" if args.runs > 1 else ""))
    print()
    spread = " | ratio range over runs" if args.runs > 1 else ""
    print("| resolution | " + " | ".join(f"{k} (ms)" for k in kinds) + f" | dora / lora | dora-per-layer / lora{spread} |")
    print("|---:|" + "---:|" * (len(kinds) + 2 + (args.runs > 1)))
    for resolution, runs in rows:
        ratios = sorted((run["dora"] / run["lora"], i) for i, run in enumerate(runs))
        median = runs[ratios[len(ratios) // 2][1]]
        cells = " | ".join(f"{median[k]:.1f}" for k in kinds)
        extra = f" | {ratios[0][0]:.3f}–{ratios[-1][0]:.3f}" if args.runs > 1 else ""
        print(f"| {resolution} px | {cells} | {median['dora'] / median['lora']:.3f} | "
              f"{median['dora-per-layer'] / median['lora']:.3f}{extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
