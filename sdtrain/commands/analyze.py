"""`sdtrain analyze ADAPTER... --base MODEL [--out DIR]`: the DoRA paper's magnitude / direction analysis.

Per adapted module and step: ΔM = mean over channels of |m' − m0| and ΔD = mean over channels of
(1 − cos(W'_c, W0_c)), with W' the file merged into the base. `--full FINETUNED` compares a fully
fine-tuned model with its base instead. Writes dm_dd.csv / dm_dd.json (one row per module and step) and,
with matplotlib, one scatter PNG per layer group; prints the slope of ΔD on ΔM and Pearson r per group.
See docs/analysis.md.
"""

from __future__ import annotations

from pathlib import Path

NAME = "analyze"
HELP = "Magnitude/direction change (ΔM, ΔD) of adapter saves or a full fine-tune against the base, per layer and step."


def add_arguments(parser):
    from sdtrain.analysis.collect import AXIS_CHOICES

    parser.add_argument("adapters", nargs="*", metavar="ADAPTER",
                        help="adapter .safetensors files (sdtrain, kohya, LyCORIS, OneTrainer; DoRA or plain LoRA), "
                             "e.g. one run's saves in step order")
    parser.add_argument("--base", required=True,
                        help="base model: builtin:tiny-sd15 / builtin:tiny-sdxl, a diffusers folder, a .safetensors "
                             "checkpoint or a hub id (as model.path)")
    parser.add_argument("--full", action="append", default=[], metavar="FINETUNED",
                        help="a fully fine-tuned model (any --base source) to compare with --base instead of adapters; "
                             "repeat for a series of checkpoints")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: analysis/ next to the first input)")
    parser.add_argument("--steps", default=None, metavar="N,N,...",
                        help="step of each input, comma-separated (default: the file's ss_steps, else 1, 2, ...)")
    parser.add_argument("--axis", default="auto", choices=AXIS_CHOICES,
                        help="channels: output rows or input columns (default auto: the file's DoRA axis; output "
                             "for plain LoRA and full checkpoints)")
    parser.add_argument("--no-plots", action="store_true", help="write the CSV/JSON tables only")
    parser.add_argument("--config-dir", default=None,
                        help="diffusers folder with configs/tokenizers for offline single-file models (model.config_dir)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt models (runs pickle)")


def parse_steps(text: str | None) -> list[int] | None:
    """"10,20,30" → [10, 20, 30]; ConfigError for anything else."""
    from sdtrain.errors import ConfigError

    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--steps {text!r}: give integers separated by commas, one per input (e.g. --steps 10,20,30)") from None


def default_out_dir(first_input: str) -> Path:
    path = Path(first_input).expanduser()
    return (path.parent if path.exists() else Path(".")) / "analysis"


def run(args) -> int:
    from sdtrain.analysis.collect import analyze_adapters, analyze_full_checkpoints
    from sdtrain.analysis.report import write_report
    from sdtrain.errors import ConfigError
    from sdtrain.export.adapter_file import load_adapter
    from sdtrain.models.loading import load_base

    if bool(args.adapters) == bool(args.full):
        raise ConfigError("give adapter files or --full FINETUNED (not both, not neither): "
                          "sdtrain analyze RUN-step*.safetensors --base MODEL, or sdtrain analyze --full TUNED --base MODEL")
    steps = parse_steps(args.steps)
    inputs = args.adapters or args.full
    out_dir = Path(args.out) if args.out else default_out_dir(inputs[0])

    def load(path):
        return load_base(path, config_dir=args.config_dir, allow_pickle=args.allow_pickle)

    adapter_files = [load_adapter(path) for path in args.adapters]  # malformed / NaN/inf files fail before the model loads
    base = load(args.base)
    if args.adapters:
        rows = analyze_adapters(adapter_files, base, steps=steps, axis=args.axis)
        mode = "adapters"
    else:
        rows = analyze_full_checkpoints(args.full, base, steps=steps, axis=args.axis, load=load)
        mode = "full"
    info = {"mode": mode, "base": str(args.base), "inputs": [str(p) for p in inputs], "axis": args.axis}
    report = write_report(rows, out_dir, info=info, plots=not args.no_plots)
    print(f"ΔM / ΔD against {args.base} ({mode}, axis {args.axis})")
    print(report.format())
    return 0
