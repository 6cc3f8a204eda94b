"""`sdtrain merge ADAPTER --base MODEL --out PATH [--strength k]`: bake an adapter into its base model."""

from __future__ import annotations

from pathlib import Path

NAME = "merge"
HELP = ("Bake an adapter into its base model and save a diffusers folder, or a single-file checkpoint "
        "when --out ends in .safetensors.")


def add_arguments(parser):
    parser.add_argument("adapter", help="adapter .safetensors file")
    parser.add_argument("--base", required=True,
                        help="base model: builtin:tiny-sd15 / builtin:tiny-sdxl, a diffusers folder, a .safetensors "
                             "checkpoint or a hub id (as model.path)")
    parser.add_argument("--out", required=True, help="output: a folder (diffusers) or a path ending in .safetensors")
    parser.add_argument("--strength", type=float, default=1.0, help="adapter strength k: W0 + k·(W' − W0) (default 1)")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="saved weight dtype (default fp16)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--config-dir", default=None,
                        help="diffusers folder with configs/tokenizers for an offline single-file --base (model.config_dir)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt/.pt --base (runs pickle)")


def run(args) -> int:
    from sdtrain.console import no_library_progress_bars
    from sdtrain.export.adapter_file import load_adapter
    from sdtrain.export.merge import _check_out, check_strength, merge_into_base, save_merged
    from sdtrain.models.loading import load_base

    _check_out(Path(args.out), args.overwrite)
    check_strength(args.strength)
    adapter_file = load_adapter(args.adapter)  # a malformed or NaN/inf file is refused before the model loads
    if adapter_file.other_keys:
        print(f"note: {len(adapter_file.other_keys)} keys outside the LoRA/DoRA layout are not merged "
              f"(e.g. {adapter_file.other_keys[0]})")
    base = load_base(args.base, config_dir=args.config_dir, allow_pickle=args.allow_pickle)
    report = merge_into_base(adapter_file, base, strength=args.strength, dtype=args.dtype)
    title = adapter_file.metadata.get("ss_output_name") or Path(args.adapter).stem
    with no_library_progress_bars():
        out = save_merged(base, args.out, dtype=args.dtype, overwrite=args.overwrite, title=title)
    print(f"merged {len(report.merged)} adapter modules (strength {args.strength:g}) into {args.base}")
    print(f"saved {'single-file checkpoint' if out.suffix == '.safetensors' else 'diffusers folder'} {out} ({args.dtype})")
    return 0
