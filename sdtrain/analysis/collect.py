"""ΔM / ΔD rows from adapter files (a run's saves) or full fine-tuned checkpoints, against a base model.

Adapter files: each module's merged weight W' is sdtrain's own merge of the file (`DoRAModule.merged_weight`:
m·V/‖V‖ along the file's axis for DoRA, W0 + ΔW for plain LoRA) on the base layer the file's kohya name
maps to (`sdtrain.export.verify`). Full checkpoints: every layer an adapter with preset "full" and text
encoders on would wrap, compared weight to weight.

Step of each input: `--steps` when given, else the file's `ss_steps` metadata, else its position (1, 2, …).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from sdtrain.analysis.decomposition import AXES, decomposition_change
from sdtrain.errors import ConfigError, ModelLoadError

log = logging.getLogger("sdtrain")

AXIS_CHOICES = ("auto",) + AXES
# Layer groups, in display order (see `layer_group`).
GROUPS = ("unet.attn.q", "unet.attn.k", "unet.attn.v", "unet.attn.out", "unet.ff", "unet.proj", "unet.conv",
          "unet.other", "te1", "te2")
_ATTN = re.compile(r"_to_(q|k|v|out_0)$")


@dataclass(frozen=True)
class ChangeRow:
    """One module at one step: ΔM, ΔD and what they were measured on."""

    source: str  # file name of the adapter / checkpoint
    step: int
    module: str  # kohya name
    group: str  # see GROUPS
    kind: str  # "linear" | "conv"
    axis: str  # channels: "output" rows or "input" columns
    channels: int
    delta_m: float
    delta_d: float
    m0_mean: float  # mean base channel norm (ΔM / m0_mean is the relative magnitude change)

    def as_dict(self) -> dict:
        return asdict(self)


def layer_group(name: str, weight_ndim: int) -> str:
    """The plot group of a kohya module name: unet.attn.{q,k,v,out}, unet.ff, unet.proj, unet.conv, unet.other,
    te1 or te2 (SD1.5's single `lora_te_` encoder is te1). Works on diffusers-style (SD1.5) and LDM-style
    (SDXL) UNet names alike."""
    from sdtrain.export.adapter_file import group_of

    component = group_of(name) or "unet"
    if component != "unet":
        return component
    attn = _ATTN.search(name)
    if attn:
        return "unet.attn." + ("out" if attn.group(1) == "out_0" else attn.group(1))
    if "_ff_net_" in name:
        return "unet.ff"
    if name.endswith(("_proj_in", "_proj_out")):
        return "unet.proj"
    if weight_ndim == 4:
        return "unet.conv"
    return "unet.other"


def resolve_steps(metadata_steps: Sequence[int | None], override: Sequence[int] | None = None) -> list[int]:
    """Step of each input: the override, else the recorded step, else the 1-based position."""
    if override is not None:
        if len(override) != len(metadata_steps):
            raise ConfigError(
                f"--steps gives {len(override)} step(s) for {len(metadata_steps)} input(s); "
                f"give exactly one step per file, in the same order"
            )
        return [int(s) for s in override]
    return [int(s) if s is not None else i + 1 for i, s in enumerate(metadata_steps)]


def file_step(adapter_file) -> int | None:
    """`ss_steps` of an adapter file (kohya and sdtrain write it), or None."""
    value = adapter_file.metadata.get("ss_steps")
    try:
        return int(str(value).strip()) if value is not None else None
    except ValueError:
        return None


def _check_axis(axis: str) -> None:
    if axis not in AXIS_CHOICES:
        raise ConfigError(f"--axis {axis!r} is not one of {', '.join(AXIS_CHOICES)}")


def _check_arch(adapter_file, base) -> None:
    arch = adapter_file.arch
    if arch is not None and arch != base.arch:
        raise ModelLoadError(
            f"{adapter_file.path}: the adapter is for {arch} but --base is a {base.arch} model; "
            f"pass the base model the adapter was trained on"
        )


@torch.no_grad()
def adapter_rows(adapter_file, base, step: int, axis: str = "auto") -> list[ChangeRow]:
    """ΔM / ΔD of every module of one adapter file (an `AdapterFile`) against a loaded base (`load_base`).

    axis "auto": the file's DoRA axis per module, "output" for plain LoRA modules.
    """
    from sdtrain.export.verify import layers_by_name, file_modules_on_layers

    _check_axis(axis)
    _check_arch(adapter_file, base)
    layers = layers_by_name(adapter_file, base.arch, base.unet, list(base.text_encoders))
    missing = [name for name in adapter_file.modules if name not in layers]
    if not layers:
        raise ModelLoadError(
            f"{adapter_file.path}: none of its {len(adapter_file.modules)} modules (e.g. {missing[0]}) is a layer "
            f"of the {base.arch} base; pass the base model the adapter was trained on"
        )
    if missing:
        log.warning("%s: %d module(s) have no layer in the base and are skipped (e.g. %s)",
                    adapter_file.path, len(missing), missing[0])
    modules = file_modules_on_layers(adapter_file, layers)
    source = Path(adapter_file.path).name if adapter_file.path else "adapter"
    rows = []
    for name, module in modules.items():
        tensors = adapter_file.modules[name]
        channel_axis = axis if axis != "auto" else (tensors.axis or "output")
        w0 = module.original_weight()
        change = decomposition_change(w0, module.merged_weight(), channel_axis)
        rows.append(ChangeRow(source, step, name, layer_group(name, w0.dim()), tensors.kind, channel_axis,
                              change.channels, change.delta_m, change.delta_d, change.m0_mean))
    return rows


def analyze_adapters(paths: Sequence, base, *, steps: Sequence[int] | None = None, axis: str = "auto") -> list[ChangeRow]:
    """Rows for a series of adapter files (e.g. one run's saves), module by module and step by step.

    `paths` holds file paths or files already read (`load_adapter`, which refuses malformed and NaN/inf files).
    """
    from sdtrain.export.adapter_file import load_adapter

    _check_axis(axis)
    files = [path if hasattr(path, "modules") else load_adapter(path) for path in paths]
    resolved = resolve_steps([file_step(f) for f in files], steps)
    rows: list[ChangeRow] = []
    for adapter_file, step in zip(files, resolved):
        rows += adapter_rows(adapter_file, base, step, axis)
    return rows


def full_layer_plan(base):
    """The layers a full fine-tune is compared on: those an adapter with preset "full" and text encoders would wrap."""
    from sdtrain.adapters.inject import NetworkSpec, plan_injection

    spec = NetworkSpec(preset="full", train_unet=True, train_text_encoder=True)
    return plan_injection(base.unet, list(base.text_encoders), base.arch, spec)


@torch.no_grad()
def full_checkpoint_rows(finetuned, base, step: int, source: str, axis: str = "auto") -> list[ChangeRow]:
    """ΔM / ΔD of every planned layer of a fully fine-tuned model against its base (both `load_base` results)."""
    _check_axis(axis)
    if finetuned.arch != base.arch:
        raise ModelLoadError(f"{source} is a {finetuned.arch} model but --base is {base.arch}; compare a fine-tune with its own base")
    channel_axis = "output" if axis == "auto" else axis
    roots = {"unet": (base.unet, finetuned.unet)}
    roots.update({f"te{i + 1}": pair for i, pair in enumerate(zip(base.text_encoders, finetuned.text_encoders))})
    rows = []
    for entry in full_layer_plan(base):
        base_root, tuned_root = roots[entry.component]
        w0 = base_root.get_submodule(entry.module_path).weight
        try:
            w1 = tuned_root.get_submodule(entry.module_path).weight
        except AttributeError:
            raise ModelLoadError(f"{source} has no layer {entry.component}.{entry.module_path}; it is not a fine-tune of --base") from None
        if tuple(w1.shape) != tuple(w0.shape):
            raise ModelLoadError(
                f"{source}: {entry.component}.{entry.module_path} has shape {list(w1.shape)}, the base {list(w0.shape)}; "
                f"it is not a fine-tune of --base"
            )
        change = decomposition_change(w0, w1, channel_axis)
        rows.append(ChangeRow(source, step, entry.kohya_name, layer_group(entry.kohya_name, w0.dim()), entry.kind,
                              channel_axis, change.channels, change.delta_m, change.delta_d, change.m0_mean))
    return rows


def analyze_full_checkpoints(paths: Sequence, base, *, steps: Sequence[int] | None = None, axis: str = "auto",
                             load=None) -> list[ChangeRow]:
    """Rows for one or more fully fine-tuned checkpoints (any `load_base` source) against `base`.

    Steps: `steps`, else the position of each checkpoint (1, 2, …). `load` (default `load_base`) loads a path.
    """
    from sdtrain.models.loading import load_base

    _check_axis(axis)
    load = load or load_base
    resolved = resolve_steps([None] * len(paths), steps)
    rows: list[ChangeRow] = []
    for path, step in zip(paths, resolved):
        finetuned = load(path)
        rows += full_checkpoint_rows(finetuned, base, step, Path(str(path)).name, axis)
        del finetuned
    return rows
