"""`sdtrain verify ADAPTER --base MODEL [--target comfyui,forge,...]`: which UIs apply the adapter exactly?

For every module the merged weight is rebuilt the way each loader does (ComfyUI v0.3.64, Forge, ComfyUI with the
output-axis fix, A1111 1.10 and 1.9, the LyCORIS package / SD.Next, diffusers) and compared with sdtrain's own
merge; every module name is also mapped to the base's single-file checkpoint key. The report names the exact
consumers and a one-line fix for the others. Exit code 0 when every requested consumer is exact (default: the
consumers the file's export target is written for), 1 otherwise, 2 for user errors.
"""

from __future__ import annotations

from pathlib import Path

NAME = "verify"
HELP = "Check which UIs (ComfyUI, Forge, A1111, LyCORIS/SD.Next, diffusers) apply an adapter file exactly."
# the loaders of sdtrain.export.verify.LOADERS, listed here so that building the CLI parser needs no torch import
TARGETS = ("comfyui", "forge", "comfyui-fixed", "a1111", "a1111-1.9", "lycoris", "diffusers")


def add_arguments(parser):
    parser.add_argument("adapter", help="adapter .safetensors file")
    parser.add_argument("--base", required=True,
                        help='base model: builtin:tiny-sd15 / builtin:tiny-sdxl, a diffusers folder, a .safetensors '
                             'checkpoint or a hub id (as model.path)')
    parser.add_argument("--target", default=None,
                        help=f"consumers that must apply the file exactly (comma-separated: {', '.join(TARGETS)}, "
                             f"or all); default: those the file's export target (sdtrain_target) is written for, "
                             f"comfyui for files without one. Every loader is reported either way")
    parser.add_argument("--strength", type=float, default=1.0, help="LoRA strength / multiplier to check (default 1)")
    parser.add_argument("--config-dir", default=None,
                        help="diffusers folder with configs/tokenizers for an offline single-file --base (model.config_dir)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt/.pt --base (runs pickle)")


def parsed_targets(text: str | None) -> list[str] | None:
    from sdtrain.errors import ConfigError
    from sdtrain.export.verify import parse_targets

    try:
        return parse_targets(text)
    except ValueError as err:
        raise ConfigError(f"--target: {err}") from None


def verify_with_base(adapter_file, base, base_spec: str, *, targets=None, strength: float = 1.0):
    """Verify an AdapterFile against a loaded base (`load_base(base_spec)`); a .safetensors base's header gives the keys."""
    from sdtrain.export.verify import verify_adapter

    base_path = Path(str(base_spec)).expanduser()
    checkpoint = base_path if base_path.is_file() and base_path.suffix.lower() == ".safetensors" else None
    return verify_adapter(adapter_file, base, targets=targets, strength=strength, base_label=str(base_spec),
                          checkpoint_path=checkpoint)


def run(args) -> int:
    from sdtrain.export.adapter_file import load_adapter
    from sdtrain.models.loading import load_base

    from sdtrain.export.merge import check_strength

    targets = parsed_targets(args.target)
    check_strength(args.strength)
    adapter_file = load_adapter(args.adapter)  # a malformed or NaN/inf file is refused before the model loads
    base = load_base(args.base, config_dir=args.config_dir, allow_pickle=args.allow_pickle)
    report = verify_with_base(adapter_file, base, args.base, targets=targets, strength=args.strength)
    print(report.format())
    return report.exit_code()
