"""The exact DoRA merge of one weight, in ComfyUI's patch convention (torch only; no ComfyUI import).

    W = W0 + k·(W' − W0),   W' = m·V/‖V‖ per channel,   V = W0 + (alpha/rank)·up·down

on either axis: "output" normalises rows / conv filters, "input" normalises columns (over out·kh·kw). W0 is the
weight ComfyUI hands to the patch (the base weight, plus earlier patches when LoRAs are stacked) and k the
strength; norms and the scale are computed in fp32 whatever the weight's dtype, and the result is written back
into the weight in its own dtype, as ComfyUI's own LoRA patches do.

A dora_scale written by sdtrain for ComfyUI's ‖W0‖ rule (metadata `sdtrain_dora_scale = "comfyui-w0-norm"`) holds
m·(‖W0‖ + ε)/‖V‖ on the output axis; it is applied as written, V·dora_scale/(‖W0‖ + ε), which is W' again.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps
MAGNITUDE = "magnitude"
W0_NORM_RULE = "comfyui-w0-norm"


def dora_axis(dora_scale_shape, weight_shape, hint: str | None = None) -> str:
    """"output" for a [out, 1, ...] / [out] dora_scale, "input" for [1, in, ...] / [in].

    A shape that fits both (a 1-D magnitude of a square layer) is read as `hint` (the file's wd_on_output) or,
    without one, as "input" (kohya's and OneTrainer's convention). ValueError for a shape that fits neither.
    """
    shape = tuple(int(d) for d in dora_scale_shape)
    out_features, in_features = int(weight_shape[0]), int(weight_shape[1])
    if len(shape) == 1:
        output, input_ = shape[0] == out_features, shape[0] == in_features
    else:
        ones = all(d == 1 for d in shape[2:])
        output = ones and shape[0] == out_features and shape[1] == 1
        input_ = ones and shape[0] == 1 and shape[1] == in_features
    if output and input_:
        return hint or "input"
    if output or input_:
        return "output" if output else "input"
    raise ValueError(f"dora_scale {list(shape)} fits neither [out={out_features}, 1] nor [1, in={in_features}]")


def channel_norm(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """‖·‖ per channel of `axis`, shaped to broadcast against the weight."""
    if axis == "output":
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return columns.reshape(1, -1, *[1] * (weight.dim() - 2))


def lora_update(weight_shape, up: torch.Tensor, down: torch.Tensor, alpha, dtype=torch.float32) -> torch.Tensor:
    """(alpha/rank)·up·down in the weight's shape (alpha None: scale 1, as ComfyUI reads a file without alpha)."""
    rank = down.shape[0]
    scale = 1.0 if alpha is None else float(alpha) / rank
    product = up.to(dtype).flatten(1) @ down.to(dtype).flatten(1)
    return (product * scale).reshape(weight_shape)


def merged_weight(weight: torch.Tensor, up, down, alpha, dora_scale, axis: str, rule: str = MAGNITUDE,
                  function=None) -> torch.Tensor:
    """W' (fp32) from the weight W0 and a module's tensors; `function` is ComfyUI's per-patch conversion."""
    w0 = weight.to(torch.float32)
    update = lora_update(w0.shape, up.to(w0.device), down.to(w0.device), alpha)
    if function is not None:
        update = function(update).to(torch.float32)
    merged = w0 + update
    magnitude = dora_scale.to(device=w0.device, dtype=torch.float32)
    norm = channel_norm(merged, axis)
    if axis == "output" and rule == W0_NORM_RULE:
        norm = channel_norm(w0, "output") + EPS
    return merged * (magnitude.reshape(norm.shape) / norm)


@torch.no_grad()
def apply_patch(weight: torch.Tensor, up, down, alpha, dora_scale, strength: float, axis: str,
                rule: str = MAGNITUDE, function=None) -> torch.Tensor:
    """weight ← W0 + k·(W' − W0), in place (ComfyUI's convention for patches); returns the weight."""
    target = merged_weight(weight, up, down, alpha, dora_scale, axis, rule, function)
    if strength != 1.0:
        target = weight.to(torch.float32) + strength * (target - weight.to(torch.float32))
    weight.copy_(target.to(weight.dtype))
    return weight
