"""Replays of how each UI merges one kohya-layout LoRA/DoRA module into its base weight.

Written by sdtrain from the loaders' code (facts only, no code copied), so that `sdtrain verify` can rebuild
the weight a UI would use and compare it with sdtrain's own merge. Checked by running the loaders' own code
on sdtrain's files (tests/integrations/test_real_loaders.py) at: ComfyUI a125cd84 (v0.3.64,
`comfy/weight_adapter/base.py` weight_decompose), Forge dfdcbab6 (`backend/patcher/lora.py`), AUTOMATIC1111
82a973c0 (v1.10.1, `extensions-builtin/Lora/network.py`), LyCORIS f49d30d6 (`lycoris/modules/locon.py`).
Every rule takes the tensors as they lie in the file and returns the merged weight in fp32:

    rule(W0, down, up, alpha, dora_scale, strength=1.0) -> W

`W0` is the base weight ([out, in] or [out, in, kh, kw]); `down` is [r, in] / [r, in, kh, kw];
`up` is [out, r] / [out, r, 1, 1]; `alpha` is a number, a 0-d tensor or None (the loader then
uses scale 1 or alpha = rank, as it does); `dora_scale` is the file's magnitude tensor or None
(plain LoRA). A `dora_scale` whose shape a loader mis-reads is broadcast exactly as that loader
broadcasts it, so a mismatch shows up as a large error (or a `RuntimeError` where torch refuses).

Rules:
- `comfyui_current`: ComfyUI v0.3.64 and Forge (`backend/patcher/lora.py`, the same function). alpha/rank
  scales up·down before the decomposition; the output axis is chosen when `dora_scale.shape[0] == out`,
  and in that branch the norm is taken of W0 instead of W0 + ΔW; float32 eps is added to the norm;
  fp32 math; strength k gives W0 + k·(W' − W0).
- `comfyui_fixed`: the same with the open upstream fix (output-axis norm of W0 + ΔW).
- `a1111_110`: AUTOMATIC1111 1.10. alpha/rank before the decomposition; the norm is always per
  input column (no eps), so an `[out, 1]` dora_scale broadcasts into an [out, in] garbage scale;
  computes in fp16 by default (`compute_dtype=torch.float32` for the same rule in fp32);
  strength k gives W0 + k·(W' − W0).
- `a1111_19`: AUTOMATIC1111 1.9. Decomposes W0 + up·down unscaled, then multiplies the
  resulting update by alpha/rank (exact only when the file stores alpha = rank).
- `lycoris`: the LyCORIS package (`lycoris.utils.merge` → `LoConModule.make_module_from_state_dict`; SD.Next
  behaves the same). It always builds an output-axis module and copies the file's dora_scale into its
  [out, 1, ...] parameter, so an input-axis dora_scale raises (torch cannot broadcast [1, in] into [out, 1]) and
  nothing is merged. alpha/rank before the decomposition (alpha 0 means alpha = rank); float32 eps added to the
  norm; strength k scales the magnitude ratio: W = V·(k·(m/‖V‖ − 1) + 1) with V = W0 + ΔW (W' at k = 1).
- `diffusers`: `load_lora_weights` on a kohya file: dora_scale is dropped, W0 + k·(alpha/rank)·up·down.
"""

from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps


def _alpha_value(alpha) -> float | None:
    if alpha is None:
        return None
    return float(alpha.item() if torch.is_tensor(alpha) else alpha)


def lora_product(down: torch.Tensor, up: torch.Tensor, weight_shape, dtype=torch.float32) -> torch.Tensor:
    """up·down as a weight update: up [out, r(,1,1)] @ down [r, in(,kh,kw)] flattened, reshaped to the weight."""
    up2 = up.to(dtype).flatten(1)
    down2 = down.to(dtype).flatten(1)
    return (up2 @ down2).reshape(weight_shape)


def output_axis_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖row‖ per output channel, shaped [out, 1, ...] to broadcast against the weight."""
    return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def input_axis_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖column‖ per input channel (over output and kernel dims), shaped [1, in, 1, ...]."""
    return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def _lerp_strength(w0: torch.Tensor, merged: torch.Tensor, strength: float) -> torch.Tensor:
    return merged if strength == 1.0 else w0 + strength * (merged - w0)


def _comfyui(w0, down, up, alpha, dora_scale, strength, fixed: bool):
    w0 = w0.to(torch.float32)
    rank = down.shape[0]
    alpha = _alpha_value(alpha)
    scale = alpha / rank if alpha is not None else 1.0
    delta = lora_product(down, up, w0.shape)
    if dora_scale is None:
        return w0 + (strength * scale) * delta
    magnitude = dora_scale.to(torch.float32)
    merged = w0 + scale * delta
    if magnitude.shape[0] == merged.shape[0]:
        norm = output_axis_norm(merged if fixed else w0)
    else:
        norm = input_axis_norm(merged)
    merged = merged * (magnitude / (norm + FP32_EPS))
    return _lerp_strength(w0, merged, strength)


def comfyui_current(w0, down, up, alpha, dora_scale, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI / Forge / reForge today (output axis normalised by ‖W0‖)."""
    return _comfyui(w0, down, up, alpha, dora_scale, strength, fixed=False)


def comfyui_fixed(w0, down, up, alpha, dora_scale, strength: float = 1.0) -> torch.Tensor:
    """ComfyUI with the open output-axis fix (normalised by ‖W0 + ΔW‖)."""
    return _comfyui(w0, down, up, alpha, dora_scale, strength, fixed=True)


def _a1111_decompose(w0, update, magnitude):
    merged = w0 + update
    return merged * (magnitude / input_axis_norm(merged)) - w0


def a1111_110(w0, down, up, alpha, dora_scale, strength: float = 1.0, compute_dtype=torch.float16) -> torch.Tensor:
    """AUTOMATIC1111 1.10: scale, then input-axis decomposition, in `compute_dtype` (fp16 by default)."""
    out_dtype = torch.float32
    w0c = w0.to(compute_dtype)
    rank = down.shape[0]
    alpha = _alpha_value(alpha)
    scale = alpha / rank if alpha is not None else 1.0
    update = lora_product(down, up, w0c.shape, dtype=compute_dtype) * scale
    if dora_scale is not None:
        update = _a1111_decompose(w0c, update, dora_scale.to(compute_dtype))
    return (w0c + update * strength).to(out_dtype)


def a1111_19(w0, down, up, alpha, dora_scale, strength: float = 1.0, compute_dtype=torch.float16) -> torch.Tensor:
    """AUTOMATIC1111 1.9: input-axis decomposition of the unscaled update, alpha/rank applied afterwards."""
    w0c = w0.to(compute_dtype)
    rank = down.shape[0]
    alpha = _alpha_value(alpha)
    scale = alpha / rank if alpha is not None else 1.0
    update = lora_product(down, up, w0c.shape, dtype=compute_dtype)
    if dora_scale is not None:
        update = _a1111_decompose(w0c, update, dora_scale.to(compute_dtype))
    return (w0c + update * (scale * strength)).to(torch.float32)


def lycoris(w0, down, up, alpha, dora_scale, strength: float = 1.0) -> torch.Tensor:
    """LyCORIS: output axis only (an input-axis dora_scale raises), fp32, eps in the norm, strength on the ratio."""
    w0 = w0.to(torch.float32)
    rank = down.shape[0]
    alpha = _alpha_value(alpha)
    scale = 1.0 if not alpha else alpha / rank
    delta = lora_product(down, up, w0.shape)
    if dora_scale is None:
        return w0 + (strength * scale) * delta
    merged = w0 + scale * delta
    norm = output_axis_norm(merged)
    magnitude = torch.empty(norm.shape).copy_(dora_scale.to(torch.float32))  # the package's copy_: may raise
    ratio = magnitude / (norm + FP32_EPS)
    if strength != 1.0:
        ratio = strength * (ratio - 1) + 1
    return merged * ratio


def diffusers_plain(w0, down, up, alpha, dora_scale, strength: float = 1.0) -> torch.Tensor:
    """diffusers `load_lora_weights` on a kohya file: dora_scale dropped, a plain LoRA."""
    w0 = w0.to(torch.float32)
    alpha = _alpha_value(alpha)
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return w0 + (strength * scale) * lora_product(down, up, w0.shape)


RULES = {
    "comfyui": comfyui_current,
    "forge": comfyui_current,
    "comfyui-fixed": comfyui_fixed,
    "a1111": a1111_110,
    "a1111-1.9": a1111_19,
    "lycoris": lycoris,
    "diffusers": diffusers_plain,
}
