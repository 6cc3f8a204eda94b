"""Bake an adapter file into its base model: W ← W0 + k·(W' − W0) for every adapted layer, then save.

The merged weights are sdtrain's own (`DoRAModule.merged_weight`), so the saved model reproduces the
adapter exactly as sdtrain applies it, in any program that loads plain checkpoints (diffusers included).
Output: a diffusers folder, or a single-file LDM/SGM `.safetensors` checkpoint when the path ends so.
NaN/inf weights are never written: merged weights that hold them, or overflow the saved dtype, are refused before
anything is written (`NonFiniteAdapter` / `SaveDtypeOverflow`), and an existing output is kept.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtrain.errors import ConfigError, ModelLoadError
from sdtrain.export.file_checks import NonFiniteAdapter, SaveDtypeOverflow, describe_counts, non_finite_counts, totals

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class MergeReport:
    merged: list[str]  # kohya names baked in
    strength: float


def check_strength(strength: float, key: str = "--strength") -> float:
    """A finite strength, else ConfigError naming `key`."""
    if not math.isfinite(strength):
        raise ConfigError(f"{key} {strength!r} is not a finite number; give the adapter strength k, e.g. {key} 0.8")
    return strength


def check_finite_weights(named: dict[str, torch.Tensor], where, dtype: str | None, fix: str) -> None:
    """Refuse weights about to be written that hold NaN/inf (`NonFiniteAdapter`) or overflow `dtype` once cast to
    it (`SaveDtypeOverflow`), naming them (counted, the first few listed) and the fix."""
    cast = non_finite_counts(named, DTYPES[dtype] if dtype else None)  # NaN/inf stay so through the cast
    if not cast:
        return
    counts = non_finite_counts({key: named[key] for key in cast})
    if counts:
        raise NonFiniteAdapter(f"{where}: nothing written: {len(counts)} merged weight(s) hold NaN/inf "
                               f"({totals(counts)}): {describe_counts(counts)}; {fix}", counts, where)
    raise SaveDtypeOverflow(
        f"{where}: nothing written: {len(cast)} merged weight(s) overflow --dtype {dtype} (|w| above "
        f"{torch.finfo(DTYPES[dtype]).max:.6g} becomes inf): {describe_counts(cast)}; use --dtype bf16 or fp32, "
        f"or {fix}", cast, where)


@torch.no_grad()
def merge_into_base(adapter_file, base, *, strength: float = 1.0, dtype: str | None = None) -> MergeReport:
    """Overwrite the base model's adapted weights (in place) with sdtrain's merged weights.

    Every file module must have its layer in the base (ModelLoadError otherwise, naming them). Merged weights
    holding NaN/inf in fp32, or in `dtype` (the dtype the model will be saved in), are refused before the base
    is changed (`check_finite_weights`).
    """
    from sdtrain.export.verify import layers_by_name, file_modules_on_layers

    check_strength(strength)

    layers = layers_by_name(adapter_file, base.arch, base.unet, list(base.text_encoders))
    missing = [name for name in adapter_file.modules if name not in layers]
    if missing:
        raise ModelLoadError(
            f"{adapter_file.path or 'adapter'}: {len(missing)} module(s) have no layer in this {base.arch} base "
            f"(e.g. {missing[0]}); merge into the base model the adapter was trained for"
        )
    modules = file_modules_on_layers(adapter_file, layers)
    merged = {name: module.merged_weight(strength) for name, module in modules.items()}
    where = str(adapter_file.path or "adapter")
    check_finite_weights(merged, where, dtype, "lower --strength, or use an earlier save of the run")
    for name, weight in merged.items():
        layer = layers[name]
        layer.weight.copy_(weight.to(layer.weight.dtype))
    return MergeReport(sorted(merged), strength)


def _scheduler_class(config: dict):
    """The sampling scheduler class named by a scheduler config (its `_class_name`, else told by its keys)."""
    import diffusers

    named = getattr(diffusers, str(config.get("_class_name", "")), None)
    if named is not None:
        return named
    if "skip_prk_steps" in config:
        return diffusers.PNDMScheduler
    if "interpolation_type" in config or "use_karras_sigmas" in config:
        return diffusers.EulerDiscreteScheduler
    return diffusers.DDIMScheduler


def build_pipeline(base):
    """A diffusers pipeline (StableDiffusion / StableDiffusionXL) from a `load_base` result."""
    import diffusers

    config = dict(base.scheduler_config)
    scheduler = _scheduler_class(config).from_config(config)
    if base.arch == "sdxl":
        te1, te2 = base.text_encoders
        tok1, tok2 = base.tokenizers
        return diffusers.StableDiffusionXLPipeline(vae=base.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                                   tokenizer_2=tok2, unet=base.unet, scheduler=scheduler)
    return diffusers.StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                             unet=base.unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} already exists; choose another path or pass --overwrite")
    if out.suffix.lower() != ".safetensors" and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder path for a diffusers model or end it in .safetensors")


def save_merged(base, out, *, dtype: str = "fp16", overwrite: bool = False, title: str | None = None) -> Path:
    """Write the (merged) base as a single-file checkpoint (`*.safetensors`) or a diffusers folder, atomically.

    Weights that hold NaN/inf once cast to `dtype` are refused before anything is written (`check_finite_weights`).
    """
    from sdtrain.files import give_normal_modes
    from sdtrain.models.single_file import save_single_file

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    _check_out(out, overwrite)
    pipe = build_pipeline(base)
    named = {f"{component}.{key}": tensor for component, module in pipe.components.items()
             if isinstance(module, torch.nn.Module) for key, tensor in module.state_dict().items()}
    check_finite_weights(named, f"--out {out}", dtype, "check the base model")
    if out.suffix.lower() == ".safetensors":
        return save_single_file(pipe, base.arch, out, dtype=DTYPES[dtype], title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.to(dtype=DTYPES[dtype])
        pipe.save_pretrained(staging, safe_serialization=True)
        give_normal_modes(staging)  # mkdtemp makes the folder 0700, safetensors writes 0600
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out
