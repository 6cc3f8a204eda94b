"""Bake an adapter file into its base model: W ← W0 + k·(W' − W0) for every adapted layer, then save.

The merged weights are sdtrain's own (`DoRAModule.merged_weight`), so the saved model reproduces the
adapter exactly as sdtrain applies it, in any program that loads plain checkpoints (diffusers included).
Output: a diffusers folder, or a single-file LDM/SGM `.safetensors` checkpoint when the path ends so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtrain.errors import ConfigError, ModelLoadError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class MergeReport:
    merged: list[str]  # kohya names baked in
    strength: float


@torch.no_grad()
def merge_into_base(adapter_file, base, *, strength: float = 1.0) -> MergeReport:
    """Overwrite the base model's adapted weights (in place) with sdtrain's merged weights.

    Every file module must have its layer in the base (ModelLoadError otherwise, naming them).
    """
    from sdtrain.export.verify import layers_by_name, file_modules_on_layers

    layers = layers_by_name(adapter_file, base.arch, base.unet, list(base.text_encoders))
    missing = [name for name in adapter_file.modules if name not in layers]
    if missing:
        raise ModelLoadError(
            f"{adapter_file.path or 'adapter'}: {len(missing)} module(s) have no layer in this {base.arch} base "
            f"(e.g. {missing[0]}); merge into the base model the adapter was trained for"
        )
    modules = file_modules_on_layers(adapter_file, layers)
    merged = {name: module.merged_weight(strength) for name, module in modules.items()}
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
    """Write the (merged) base as a single-file checkpoint (`*.safetensors`) or a diffusers folder, atomically."""
    from sdtrain.files import give_normal_modes
    from sdtrain.models.single_file import save_single_file

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    _check_out(out, overwrite)
    pipe = build_pipeline(base)
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
