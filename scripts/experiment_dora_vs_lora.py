"""LoRA vs DoRA on the pretrained tiny SDXL (`builtin:tiny-sdxl`), teaching the demo's new concept (the star):
equal rank and steps, several learning rates per method (each method compared at its best), several seeds;
held-out denoising loss on the new concept and on the pretraining world's captions (forgetting), and the DoRA
paper's weight-decomposition analysis (ΔM, ΔD; Liu et al. 2024, Figure 2) per method.

    python3 scripts/experiment_dora_vs_lora.py --out output/dora_vs_lora [--seeds 0,1,2] [--lrs 1e-3,3e-3,1e-2]

Every run is the demo run (configs/demo.toml, through `sdtrain.config.load_config` and `sdtrain.train.loop.train`)
with these overrides: network.type / network.decompose_axis of the method, network.rank = alpha = --rank,
torch AdamW at the run's learning rate with a constant schedule, train.seed, --steps steps, fp32 saves every
--save-every steps, no samples, no loader verification. Methods:

- lora: plain LoRA; dora: DoRA on sdtrain's default output axis; dora-input: DoRA on the input axis (the paper's).

After each run the final adapter is merged into a fresh copy of the base (`sdtrain.export.merge.merge_into_base`)
and scored with `shapes_dataset.denoising_loss` (fixed noise and timesteps) on
- new concept: `demo_held_out_scenes(3)`: stars in colours / on backgrounds the demo images do not show;
- old captions: `old_caption_scenes(32)`: fresh scenes of the pretraining distribution (forgetting).
The best learning rate of a method is the one with the lowest new-concept loss averaged over seeds. Its runs' saves
go through `sdtrain.analysis` (ΔM, ΔD per module and save; least-squares slope dΔD/dΔM per layer group, and the
share of modules whose own slope over the saves is negative); LoRA is analysed along each axis a DoRA run used.
When the methods' best learning rates differ, the analysis is repeated with every method at LoRA's best, so that
the learning rate does not decide the comparison.

Writes under --out: runs/<method>-lr<lr>-s<seed>/ (saves, and score.json when the run is scored), results.json
(every run and the summaries), report.md (the tables), loss_vs_lr.png, dm_dd_<axis>.png (side by side, seed 0 at
each method's best lr; dm_dd_<axis>-lr<lr>.png all at LoRA's best lr when the best lrs differ). Finished runs
are kept: running the command again only trains what is missing.

In parallel: `--shard K/N` trains and scores the runs K, K+N, K+2N, … of the grid (in the order methods × lrs ×
seeds) and stops without the summary; start one process per shard with the same --out, then run the command once
more without --shard to write the tables and plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import shapes_dataset as shapes  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "demo.toml"
METHODS = {  # label -> (network.type, network.decompose_axis)
    "lora": ("lora", "output"),
    "dora": ("dora", "output"),
    "dora-input": ("dora", "input"),
}
GROUPS = ("unet.attn.q", "unet.attn.k", "unet.attn.v", "unet.attn.out", "unet.ff", "unet.proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "output" / "dora_vs_lora")
    p.add_argument("--methods", default="lora,dora,dora-input")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning rates tried for every method")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="train only runs K, K+N, ... of the grid and skip the summary (N processes in parallel)")
    return p.parse_args(argv)


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise SystemExit(f"--shard {text}: expected K/N with 0 <= K < N, e.g. --shard 0/2 and --shard 1/2")
    return index, count


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-s{seed}"


def score_path(out: Path, name: str) -> Path:
    return out / "runs" / name / "score.json"


def write_json(path: Path, value) -> None:
    from sdtrain.files import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(value, indent=1).encode())


def train_run(method: str, lr: float, seed: int, args, folder: Path):
    from sdtrain.config import load_config
    from sdtrain.train.loop import train

    kind, axis = METHODS[method]
    overrides = [
        f"network.type={kind}", f"network.decompose_axis={axis}", f"network.rank={args.rank}",
        f"network.alpha={args.rank}", "optimizer.type=AdamW", f"optimizer.lr={lr}", "scheduler.type=constant",
        "scheduler.warmup_steps=0", f"train.max_steps={args.steps}", f"train.seed={seed}",
        f"train.output_dir={folder.as_posix()}", f"train.output_name={method}",
        f"data.cache_dir={(args.out / 'cache').as_posix()}", f"save.every_n_steps={args.save_every}",
        "save.dtype=fp32", "save.targets=[]", "sample.every_n_steps=0", "log.tensorboard=false",
    ]
    return train(load_config(DEMO_CONFIG, overrides), quiet=True)


def scored(adapter: Path | None, base_path: str) -> dict:
    """Held-out losses of the base with `adapter` merged in (None: the base itself)."""
    from sdtrain.export.adapter_file import load_adapter
    from sdtrain.export.merge import merge_into_base
    from sdtrain.models.loading import load_base

    base = load_base(base_path)
    if adapter is not None:
        merge_into_base(load_adapter(adapter), base)
    parts = (base.arch, base.unet, base.vae, base.text_encoders, base.tokenizers, base.noise_scheduler)
    return {"new_loss": shapes.denoising_loss(*parts, shapes.demo_held_out_scenes(3)),
            "old_loss": shapes.denoising_loss(*parts, shapes.old_caption_scenes(32))}


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def pm(values, spec: str = ".4f") -> str:
    mean, std = mean_std(values)
    return f"{mean:{spec}} ± {std:{spec.replace('+', '')}}"


def module_slopes(rows) -> list[float]:
    """Least-squares slope dΔD/dΔM of every module over its own saves."""
    from sdtrain.analysis.table import fit_line

    by_module: dict = {}
    for r in rows:
        by_module.setdefault(r.module, []).append(r)
    slopes = []
    for points in by_module.values():
        if len(points) >= 3 and max(p.delta_m for p in points) > 0:
            slope = fit_line([p.delta_m for p in points], [p.delta_d for p in points])[0]
            if slope == slope:
                slopes.append(slope)
    return slopes


def analysis(method: str, axis: str, saves: list[str], base) -> dict:
    from sdtrain.analysis import analyze_adapters, group_fits

    rows = analyze_adapters(saves, base, axis=axis)
    fits = {f.group: {"slope": f.slope, "r": f.pearson_r, "points": f.points} for f in group_fits(rows)}
    slopes = module_slopes(rows)
    negative = sum(s < 0 for s in slopes) / len(slopes) if slopes else float("nan")
    return {"fits": fits, "negative_module_share": negative, "rows": rows}


def main(argv=None) -> int:
    import torch

    from sdtrain.config import load_config

    args = parse_args(argv)
    shard, shards = parse_shard(args.shard)
    torch.set_num_threads(args.threads)
    args.out = args.out.resolve()
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    base_path = load_config(DEMO_CONFIG).model.path
    base_scores_path = args.out / "base_scores.json"
    if not base_scores_path.is_file():
        write_json(base_scores_path, scored(None, base_path))
    started, trained = time.time(), 0
    todo = [(m, lr, s) for m in methods for lr in lrs for s in seeds]
    missing = [t for i, t in enumerate(todo) if i % shards == shard and not score_path(args.out, run_name(*t)).is_file()]
    for method, lr, seed in missing:
        name = run_name(method, lr, seed)
        t0, c0 = time.time(), time.process_time()
        result = train_run(method, lr, seed, args, args.out / "runs" / name)
        entry = {"method": method, "lr": lr, "seed": seed, "adapter": str(result.final_adapter),
                 "saves": [str(p) for p in result.saved],
                 "train_loss_last20": sum(result.losses[-20:]) / len(result.losses[-20:]),
                 **scored(result.final_adapter, base_path),
                 "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
        write_json(score_path(args.out, name), entry)
        trained += 1
        eta = (time.time() - started) / trained * (len(missing) - trained)
        print(f"{time.strftime('%H:%M:%S')} [{trained}/{len(missing)}] {name}: new concept {entry['new_loss']:.4f}, "
              f"old captions {entry['old_loss']:.4f} ({entry['cpu_s']:.0f} s CPU; ETA {eta / 60:.0f} min)", flush=True)
    if args.shard is not None:
        print(f"shard {shard}/{shards} done; once every shard is, run the command without --shard for the summary")
        return 0
    command = "python3 scripts/experiment_dora_vs_lora.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {"command": command, "base": base_path, "settings": {
        "methods": methods, "seeds": seeds, "lrs": lrs, "rank": args.rank, "steps": args.steps,
        "save_every": args.save_every}, "scores": {"base": json.loads(base_scores_path.read_text())},
        "runs": {run_name(*t): json.loads(score_path(args.out, run_name(*t)).read_text()) for t in todo}}
    report = summarise(results, methods, seeds, lrs, base_path, args)
    write_json(args.out / "results.json", results)
    (args.out / "report.md").write_text(report)
    print(report)
    return 0


def summarise(results: dict, methods, seeds, lrs, base_path: str, args) -> str:
    from sdtrain.models.loading import load_base

    runs = results["runs"]
    base_scores = results["scores"]["base"]
    lines = [f"Base {base_path}: new concept {base_scores['new_loss']:.4f}, old captions {base_scores['old_loss']:.4f}",
             "", "| method | lr | new-concept loss | old-caption loss | final train loss |", "|---|---|---|---|---|"]
    best = {}
    for method in methods:
        per_lr = {}
        for lr in lrs:
            entries = [runs[run_name(method, lr, s)] for s in seeds]
            per_lr[lr] = mean_std(e["new_loss"] for e in entries)[0]
            lines.append(f"| {method} | {lr:g} | {pm(e['new_loss'] for e in entries)} | "
                         f"{pm(e['old_loss'] for e in entries)} | {pm(e['train_loss_last20'] for e in entries)} |")
        best[method] = min(per_lr, key=per_lr.get)
    lines += ["", "Each method at its best learning rate (lowest mean new-concept loss):", "",
              "| method | best lr | new-concept loss | old-caption loss (forgetting: minus the base's) |", "|---|---|---|---|"]
    for method in methods:
        entries = [runs[run_name(method, best[method], s)] for s in seeds]
        forget = [e["old_loss"] - base_scores["old_loss"] for e in entries]
        lines.append(f"| {method} | {best[method]:g} | {pm(e['new_loss'] for e in entries)} | "
                     f"{pm(e['old_loss'] for e in entries)} ({pm(forget, '+.4f')}) |")
    results["best_lr"] = best
    if "lora" in methods and len(seeds) > 1:
        lines += ["", "Paired by seed (a seed draws the same data order and noise for every method): DoRA's loss minus LoRA's at the same "
                      "lr, mean ± std over seeds, and in how many seeds DoRA's is lower:", "",
                  "| method | lr | new concept: DoRA − LoRA | lower in | old captions: DoRA − LoRA | lower in |",
                  "|---|---|---|---|---|---|"]
        for method in [m for m in methods if m != "lora"]:
            for lr in lrs:
                cells = []
                for key in ("new_loss", "old_loss"):
                    diff = [runs[run_name(method, lr, s)][key] - runs[run_name("lora", lr, s)][key] for s in seeds]
                    cells += [pm(diff, "+.4f"), f"{sum(d < 0 for d in diff)} of {len(seeds)}"]
                lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + " |")
    plot_losses(results, methods, seeds, lrs, args.out / "loss_vs_lr.png")

    base = load_base(base_path)
    axes = list(dict.fromkeys(METHODS[m][1] for m in methods if METHODS[m][0] == "dora"))
    results["analysis"] = {}
    choices = [("at its best lr", best, "")]
    if "lora" in methods and len(set(best.values())) > 1:  # and all at one lr, so that lr does not decide the slope
        common = best["lora"]
        choices.append((f"at LoRA's best lr, {common:g}", {m: common for m in methods}, f"-lr{common:g}"))
    for label, chosen, suffix in choices:
        for axis in axes:
            compared = ["lora"] + [m for m in methods if METHODS[m] == ("dora", axis)]
            if suffix and all(chosen[m] == best[m] for m in compared):
                continue  # the same runs as in the best-lr table
            lines += analysis_table(results, methods, seeds, chosen, axis, label, base,
                                    args.out / f"dm_dd_{axis}{suffix}.png")
    lines += ["", f"Command: {results['command']}"]
    return "\n".join(lines) + "\n"


def analysis_table(results: dict, methods, seeds, chosen: dict, axis: str, label: str, base, plot: Path) -> list:
    """The ΔM/ΔD table along `axis` for LoRA and the DoRA methods of that axis, each at its lr in `chosen`
    (results["analysis"] gets the per-seed fits; `plot`: seed 0's points)."""
    from sdtrain.analysis.plots import plot_comparison, plots_available

    runs = results["runs"]
    compared = ["lora"] + [m for m in methods if METHODS[m] == ("dora", axis)]
    lines = ["", f"ΔM/ΔD along the {axis} axis (each method {label}; slope dΔD/dΔM of the layer group over all "
                 f"modules and saves, mean ± std over seeds; last column: share of modules whose own slope over "
                 f"the saves is negative):", "",
             "| method | lr | " + " | ".join(GROUPS) + " | negative modules |", "|---" * (len(GROUPS) + 3) + "|"]
    series = {}
    for method in compared:
        per_seed = []
        for seed in seeds:
            found = analysis(method, axis, runs[run_name(method, chosen[method], seed)]["saves"], base)
            rows = found.pop("rows")
            if seed == seeds[0]:
                series[f"{method} (lr {chosen[method]:g})"] = rows
            per_seed.append(found)
        results["analysis"][f"{method}/{axis}/lr{chosen[method]:g}"] = per_seed
        cells = []
        for group in GROUPS:
            slopes = [f["fits"][group]["slope"] for f in per_seed if group in f["fits"]]
            cells.append(pm(slopes, ".3g") if slopes else "-")
        share = pm([f["negative_module_share"] for f in per_seed], ".2f")
        lines.append(f"| {method} | {chosen[method]:g} | " + " | ".join(cells) + f" | {share} |")
    if plots_available():
        plot_comparison(series, plot, groups=["unet.attn.q", "unet.attn.v", "unet.ff"])
    return lines


def plot_losses(results: dict, methods, seeds, lrs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, base = results["runs"], results["scores"]["base"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "new_loss", "new concept (held-out star captions)"),
                           (axes[1], "old_loss", "old captions (forgetting)")):
        for method in methods:
            stats = [mean_std(runs[run_name(method, lr, s)][key] for s in seeds) for lr in lrs]
            ax.errorbar(lrs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=method)
        ax.axhline(base[key], color="grey", linestyle="--", label="base")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("held-out denoising loss")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
