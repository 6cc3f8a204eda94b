"""`sdtrain verify ADAPTER --base MODEL [--target comfyui,a1111,...]`: will each UI apply the adapter as trained?

For every module the merged weight is rebuilt the way each loader does (ComfyUI today, ComfyUI with the
output-axis fix, A1111 1.10 and 1.9, LyCORIS / SD.Next, diffusers) and compared with sdtrain's own merge;
every module name is also mapped to the base's single-file checkpoint key. Exit code 1 when a requested
target is incompatible, 2 for user errors.
"""

from __future__ import annotations

from pathlib import Path

NAME = "verify"
HELP = "Check that an adapter file merges in ComfyUI / A1111 / LyCORIS exactly as sdtrain trained it."
# the loaders of sdtrain.export.verify.LOADERS, listed here so that building the CLI parser needs no torch import
TARGETS = ("comfyui", "comfyui-fixed", "a1111", "a1111-1.9", "lycoris", "diffusers")
DEFAULT_TARGETS = ("comfyui", "a1111")


def add_arguments(parser):
    parser.add_argument("adapter", help="adapter .safetensors file")
    parser.add_argument("--base", required=True,
                        help='base model: builtin:tiny-sd15 / builtin:tiny-sdxl, a diffusers folder, a .safetensors '
                             'checkpoint or a hub id (as model.path)')
    parser.add_argument("--target", default=",".join(DEFAULT_TARGETS),
                        help=f"loaders that must apply the file (comma-separated: {', '.join(TARGETS)}, or all); "
                             f"default {','.join(DEFAULT_TARGETS)}. Every loader is reported either way")
    parser.add_argument("--strength", type=float, default=1.0, help="LoRA strength / multiplier to check (default 1)")
    parser.add_argument("--config-dir", default=None,
                        help="diffusers folder with configs/tokenizers for an offline single-file --base (model.config_dir)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt/.pt --base (runs pickle)")


def run(args) -> int:
    from sdtrain.errors import ConfigError
    from sdtrain.export.adapter_file import load_adapter
    from sdtrain.export.verify import parse_targets, verify_adapter
    from sdtrain.models.loading import load_base

    try:
        targets = parse_targets(args.target)
    except ValueError as err:
        raise ConfigError(f"--target: {err}") from None
    adapter_file = load_adapter(args.adapter)
    base = load_base(args.base, config_dir=args.config_dir, allow_pickle=args.allow_pickle)
    base_path = Path(str(args.base)).expanduser()
    checkpoint = base_path if base_path.is_file() and base_path.suffix.lower() == ".safetensors" else None
    report = verify_adapter(adapter_file, base, targets=targets, strength=args.strength, base_label=str(args.base),
                            checkpoint_path=checkpoint)
    print(report.format())
    return report.exit_code()
