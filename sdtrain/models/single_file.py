"""Single-file (A1111/ComfyUI) Stable Diffusion checkpoints: write one, read its keys, detect its architecture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from sdtrain.errors import ModelLoadError
from sdtrain.models.ldm_layout import pipeline_to_single_file_state_dict

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MODELSPEC_ARCH = {
    "sd15": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
}


def save_single_file(
    pipe, arch: str, path: str | os.PathLike, *, dtype: torch.dtype | None = None, title: str | None = None
) -> Path:
    """Write `pipe` as a single `.safetensors` checkpoint in the LDM/SGM layout (atomic: temp file + rename)."""
    from sdtrain.files import atomic_save_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, got {path}")
    state = pipeline_to_single_file_state_dict(pipe, arch, dtype=dtype)
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _MODELSPEC_ARCH[arch],
        "modelspec.title": title or path.stem,
    }
    return atomic_save_safetensors(state, path, metadata)


def load_pickle_state_dict(path: str | os.PathLike, allow_pickle: bool, key: str = "model.allow_pickle") -> dict:
    """State dict of a `.ckpt`/`.pt` file, refused unless the user allowed pickle files (`key`)."""
    path = Path(path)
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} is a pickle checkpoint ({path.suffix}), which can run code when loaded; convert it to "
            f".safetensors, or set {key} = true if you trust the file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user problem
        raise ModelLoadError(f"could not read pickle checkpoint {path}: {exc}; convert it to .safetensors") from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return state


def read_state_dict_keys(path: str | os.PathLike, *, allow_pickle: bool = False) -> list[str]:
    """Tensor names of a checkpoint file (`.safetensors` read from the header only)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file {path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return list(load_pickle_state_dict(path, allow_pickle))
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path} is not a readable .safetensors file: {exc}") from exc


def detect_single_file_arch(path_or_keys: str | os.PathLike | Iterable[str]) -> str:
    """"sd15", "sd2" or "sdxl" from a single-file checkpoint's keys (its text-encoder layout)."""
    where = ""
    if isinstance(path_or_keys, (str, os.PathLike)):
        where = f" {path_or_keys}"
        keys = read_state_dict_keys(path_or_keys)
    else:
        keys = list(path_or_keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelLoadError(f"checkpoint{where} is an SDXL refiner (OpenCLIP-G only), which sdtrain does not train")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    if any(k.startswith("model.diffusion_model.label_emb.") for k in keys):
        return "sdxl"
    raise ModelLoadError(
        f"cannot tell the architecture of checkpoint{where}: it has no Stable Diffusion text-encoder keys "
        "(cond_stage_model.* or conditioner.embedders.*); set model.arch to sd15, sd2 or sdxl if it is one"
    )
