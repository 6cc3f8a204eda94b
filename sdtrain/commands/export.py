"""`sdtrain export ADAPTER --base MODEL --target T [--out PATH]`: write an adapter for another consumer.

Targets (`sdtrain.export.targets.TARGETS`): comfyui / forge (output-axis magnitudes compensate their ‖W0‖ norm),
lycoris (the true magnitude, output axis), a1111 / portable (input axis). The base model is the one the adapter was
trained on: the comfyui encoding and decoding use its weights. The written file is verified against the base and
the verdict printed; exit code 0 when every consumer the target claims applies it exactly.
"""

from __future__ import annotations

from pathlib import Path

NAME = "export"
HELP = "Re-encode an adapter's DoRA magnitudes for a UI (comfyui, forge, lycoris, a1111, portable) and verify it."
TARGETS = ("comfyui", "forge", "lycoris", "a1111", "portable")  # sdtrain.export.targets.TARGETS, without torch


def add_arguments(parser):
    parser.add_argument("adapter", help="adapter .safetensors file (sdtrain, kohya, LyCORIS, OneTrainer)")
    parser.add_argument("--base", required=True,
                        help="the base model the adapter was trained on: builtin:tiny-sd15 / builtin:tiny-sdxl, a "
                             "diffusers folder, a .safetensors checkpoint or a hub id (as model.path)")
    parser.add_argument("--target", required=True, choices=TARGETS,
                        help="the consumer to write for (see README, Load in your UI)")
    parser.add_argument("--out", default=None,
                        help="output file (default: ADAPTER's name with -TARGET added, in the same folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--config-dir", default=None,
                        help="diffusers folder with configs/tokenizers for an offline single-file --base (model.config_dir)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt/.pt --base (runs pickle)")


def output_path(adapter: str, target: str, out: str | None, overwrite: bool) -> Path:
    from sdtrain.errors import ConfigError

    source = Path(adapter)
    path = Path(out) if out else source.with_name(f"{source.stem}-{target}{source.suffix or '.safetensors'}")
    if path.exists() and not overwrite:
        raise ConfigError(f"--out {path} already exists; choose another path or pass --overwrite")
    return path


def run(args) -> int:
    from sdtrain.commands.verify import verify_with_base
    from sdtrain.export.adapter_file import load_adapter, write_adapter_tensors
    from sdtrain.export.retarget import retargeted_tensors
    from sdtrain.export.verify import layers_by_name
    from sdtrain.models.loading import load_base

    out = output_path(args.adapter, args.target, args.out, args.overwrite)
    adapter_file = load_adapter(args.adapter)  # a malformed or NaN/inf file is refused before the model loads
    base = load_base(args.base, config_dir=args.config_dir, allow_pickle=args.allow_pickle)
    layers = layers_by_name(adapter_file, base.arch, base.unet, list(base.text_encoders))
    tensors, metadata = retargeted_tensors(adapter_file, {n: layer.weight for n, layer in layers.items()}, args.target)
    write_adapter_tensors(tensors, out, metadata)
    dropped = f" ({len(adapter_file.other_keys)} keys outside the LoRA layout dropped)" if adapter_file.other_keys else ""
    print(f"wrote {out} for target {args.target} ({len(adapter_file.modules)} modules){dropped}")
    report = verify_with_base(load_adapter(out), base, args.base)
    print(report.format())
    return report.exit_code()
