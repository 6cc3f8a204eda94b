"""Train LoRA and DoRA at the same rank, steps, learning rate and seed on the tiny SD1.5, then compare their
weight-decomposition analyses (ΔM, ΔD per layer and step; the DoRA paper's Figure 2 view).

Runs the real trainer (`sdtrain.train.loop.Trainer`) on the bundled datasets/demo images, saving every
`--save-every` steps, then `sdtrain.analysis` on each run's saves against the same base:

- lora: plain LoRA, analysed with output-row channels (and input-column channels when an input-axis DoRA runs);
- dora: DoRA on sdtrain's default output axis; dora-input: DoRA on the input axis (the paper's columns).

Writes into --out: <run>/ (the run's saves), analysis-<run>-<axis>/ (dm_dd.csv, dm_dd.json, per-group PNGs),
lora_vs_dora_<axis>.png (side by side, one row per layer group), summary.json; prints the fit tables.

    python scripts/experiment_dora_vs_lora.py --out output/dora_vs_lora
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "builtin:tiny-sd15"
VARIANTS = {  # run label -> (network.type, network.decompose_axis)
    "lora": ("lora", "output"),
    "dora": ("dora", "output"),
    "dora-input": ("dora", "input"),
}

DEMO_CONFIG = REPO / "configs" / "demo.toml"  # the experiment is the demo run with these overrides


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "output" / "dora_vs_lora"), help="output folder")
    parser.add_argument("--steps", type=int, default=60, help="training steps of each run")
    parser.add_argument("--save-every", type=int, default=6, help="save the adapter every N steps")
    parser.add_argument("--rank", type=int, default=4, help="rank (alpha = rank) of both adapters")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of both runs")
    parser.add_argument("--preset", default="attn-mlp", choices=("attn", "attn-mlp", "full"), help="network.preset")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of both runs")
    parser.add_argument("--runs", default="lora,dora,dora-input",
                        help=f"comma-separated runs among {', '.join(VARIANTS)} (lora is always trained)")
    parser.add_argument("--data", default=str(REPO / "datasets" / "demo"), help="dataset folder")
    return parser.parse_args(argv)


def train_run(label: str, args, out: Path) -> list[Path]:
    """Train one variant; returns its adapter saves."""
    from sdtrain.config import load_config
    from sdtrain.train.loop import Trainer

    kind, axis = VARIANTS[label]
    out.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"model.path={BASE}", "data.resolution=64", "data.min_bucket_side=64", "data.max_bucket_side=128",
        f"data.subsets.0.path={Path(args.data).resolve().as_posix()}", f"data.cache_dir={(out / 'cache').as_posix()}",
        f"network.type={kind}", f"network.decompose_axis={axis}", f"network.rank={args.rank}",
        f"network.alpha={args.rank}", f"network.preset={args.preset}",
        "optimizer.type=AdamW", f"optimizer.lr={args.lr}", "scheduler.type=constant", "scheduler.warmup_steps=0",
        f"train.max_steps={args.steps}", "train.batch_size=2", "train.mixed_precision=no", f"train.seed={args.seed}",
        "train.min_snr_gamma=0", f"train.output_dir={(out / label).as_posix()}", f"train.output_name={label}",
        f"save.every_n_steps={args.save_every}", "save.dtype=fp32", "save.targets=[]",
        "sample.every_n_steps=0", "log.tensorboard=false",
    ]
    start = time.perf_counter()
    result = Trainer(load_config(DEMO_CONFIG, overrides), quiet=True).run()
    losses = result.losses
    tail = sum(losses[-10:]) / max(1, len(losses[-10:]))
    print(f"trained {label}: {result.steps} steps in {time.perf_counter() - start:.0f} s, "
          f"{len(result.saved)} saves, mean loss of the last 10 steps {tail:.4f}", flush=True)
    return list(result.saved)


def fit_table(fits_by_run: dict[str, list]) -> str:
    """group | slope and r of every run, side by side."""
    labels = list(fits_by_run)
    groups = list(dict.fromkeys(f.group for fits in fits_by_run.values() for f in fits))
    cell = {(label, f.group): f for label, fits in fits_by_run.items() for f in fits}

    def fmt(fit):
        if fit is None:
            return "-"
        slope = "-" if fit.slope != fit.slope else f"{fit.slope:+.2e}"
        r = "-" if fit.pearson_r != fit.pearson_r else f"{fit.pearson_r:+.2f}"
        return f"{slope} (r {r})"

    header = ["group"] + [f"{label}: slope dΔD/dΔM" for label in labels]
    body = [[group] + [fmt(cell.get((label, group))) for label in labels] for group in groups]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) for row in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    from sdtrain.analysis import analyze_adapters, group_fits, write_report
    from sdtrain.analysis.plots import plot_comparison, plots_available
    from sdtrain.models.loading import load_base

    args = parse_args(argv)
    runs = ["lora"] + [r for r in dict.fromkeys(args.runs.split(",")) if r and r != "lora"]
    unknown = [r for r in runs if r not in VARIANTS]
    if unknown:
        print(f"unknown run(s) {unknown}; choose among {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    out = Path(args.out).resolve()  # config paths are relative to the config file, so pass absolute ones
    started = time.perf_counter()
    saves = {label: train_run(label, args, out) for label in runs}

    base = load_base(BASE)
    axes = list(dict.fromkeys(VARIANTS[r][1] for r in runs if VARIANTS[r][0] == "dora")) or ["output"]
    summary = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "comparisons": {}}
    for axis in axes:
        series = {f"LoRA ({axis} axis)": analyze_adapters(saves["lora"], base, axis=axis)}
        for label in runs:
            if VARIANTS[label] == ("dora", axis):
                series[f"DoRA ({axis} axis)"] = analyze_adapters(saves[label], base)
        fits, last_fits = {}, {}
        for name, rows in series.items():
            folder = out / f"analysis-{name.split()[0].lower()}-{axis}"
            report = write_report(rows, folder, info={"run": name, "base": BASE, "axis": axis})
            fits[name] = report.fits
            last = max(r.step for r in rows)
            last_fits[name] = group_fits([r for r in rows if r.step == last])
        print(f"\nchannels along the {axis} axis ({len({r.module for r in rows})} modules x "
              f"{len({r.step for r in rows})} saves per run); all saves:")
        print(fit_table(fits))
        print("last save only (across modules):")
        print(fit_table(last_fits))
        comparison = {"fits": {name: [vars(f) for f in fs] for name, fs in fits.items()},
                      "last_save_fits": {name: [vars(f) for f in fs] for name, fs in last_fits.items()}}
        if plots_available():
            png = out / f"lora_vs_dora_{axis}.png"
            counts = plot_comparison(series, png)
            comparison["png"] = str(png)
            comparison["points"] = {f"{label} / {group}": n for (label, group), n in counts.items()}
            print(f"side-by-side plot: {png}")
        summary["comparisons"][axis] = comparison
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    print(f"\ndone in {time.perf_counter() - started:.0f} s; tables and plots under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
