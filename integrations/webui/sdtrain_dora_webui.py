"""sdtrain's A1111 / Forge extension: the built-in Lora applies output-axis DoRA exactly; nothing else changes.

An output-axis `dora_scale` ([out, 1, ...], or 1-D [out] of a non-square layer) gets W' = m·V/‖V‖ per output
channel, V = W0 + ΔW, computed in fp32:
- AUTOMATIC1111 (checked against 1.10.1, 82a973c0): `network.NetworkModule.apply_weight_decompose` divides by the
  norm of every input column, so an [out, 1] scale broadcasts into an [out, in] one. It is wrapped: output-axis
  modules return W' − W0 (A1111 then multiplies by the Lora weight: W0 + k·(W' − W0)); input-axis modules go to
  A1111's own code unchanged.
- Forge (checked against dfdcbab6): `backend.patcher.lora.weight_decompose` divides output-axis files by ‖W0‖. It
  is replaced for output-axis modules (W0 + k·(W' − W0), as Forge applies a strength); input-axis modules go to
  Forge's own code unchanged.
Files sdtrain wrote for ComfyUI's ‖W0‖ rule (metadata `sdtrain_dora_scale = "comfyui-w0-norm"`) hold
m·(‖W0‖ + ε)/‖V‖ and are applied as written (divided by ‖W0‖ + ε), which is W' again. A1111 reads the metadata
from the network's file; Forge's dora_scale tensors are tagged with it when the file is loaded.
"""

from __future__ import annotations

import json
import sys

import torch

RULE_KEY = "sdtrain_dora_scale"
W0_NORM_RULE = "comfyui-w0-norm"
TAG = "_sdtrain_dora_scale_rule"
EPS = torch.finfo(torch.float32).eps


def is_output_axis(dora_scale, weight) -> bool:
    """[out, 1, ...] (2-D+), or 1-D [out] where out != in (a square 1-D scale is the input-axis convention)."""
    if dora_scale is None:
        return False
    shape, out_features, in_features = tuple(dora_scale.shape), weight.shape[0], weight.shape[1]
    if len(shape) >= 2:
        return out_features != 1 and shape[0] == out_features and all(d == 1 for d in shape[1:])
    return len(shape) == 1 and shape[0] == out_features and out_features != in_features


def output_axis_weight(merged: torch.Tensor, dora_scale: torch.Tensor, w0: torch.Tensor, rule) -> torch.Tensor:
    """W' = merged·m/‖merged‖ per output channel (fp32); with the ‖W0‖ rule, merged·dora_scale/(‖W0‖ + ε)."""
    rows = (w0 if rule == W0_NORM_RULE else merged).reshape(merged.shape[0], -1).norm(dim=1)
    if rule == W0_NORM_RULE:
        rows = rows + EPS
    shape = (-1, *[1] * (merged.dim() - 1))
    return merged * (dora_scale.to(device=merged.device, dtype=torch.float32).reshape(shape) / rows.reshape(shape))


def a1111_apply_weight_decompose(original):
    """A1111's NetworkModule.apply_weight_decompose(self, updown, orig_weight) -> W' − W0, exact on the output axis."""
    def apply_weight_decompose(self, updown, orig_weight):
        if not is_output_axis(self.dora_scale, orig_weight):
            return original(self, updown, orig_weight)
        on_disk = getattr(getattr(self, "network", None), "network_on_disk", None)
        rule = (getattr(on_disk, "metadata", None) or {}).get(RULE_KEY)
        with torch.no_grad():
            w0 = orig_weight.to(torch.float32)
            merged = w0 + updown.to(device=w0.device, dtype=torch.float32)
            return (output_axis_weight(merged, self.dora_scale, w0, rule) - w0).to(updown.dtype)

    apply_weight_decompose.sdtrain_original = original
    return apply_weight_decompose


def forge_weight_decompose(original):
    """Forge's weight_decompose(dora_scale, weight, lora_diff, alpha, strength, dtype, function), exact on the output axis."""
    def weight_decompose(dora_scale, weight, lora_diff, alpha, strength, computation_dtype, function):
        if not is_output_axis(dora_scale, weight):
            return original(dora_scale, weight, lora_diff, alpha, strength, computation_dtype, function)
        with torch.no_grad():
            w0 = weight.to(torch.float32)
            merged = w0 + function(lora_diff * alpha).to(device=w0.device, dtype=torch.float32)
            target = output_axis_weight(merged, dora_scale, w0, getattr(dora_scale, TAG, None))
            if strength != 1.0:
                target = w0 + strength * (target - w0)
            weight.copy_(target.to(weight.dtype))
        return weight

    weight_decompose.sdtrain_original = original
    return weight_decompose


def file_metadata(path) -> dict:
    """The `__metadata__` of a .safetensors file ({} for anything else)."""
    if not str(path).lower().endswith(".safetensors"):
        return {}
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            return json.loads(handle.read(size)).get("__metadata__") or {}
    except (OSError, ValueError):
        return {}


def forge_tagging_loader(original):
    """Forge's networks.load_lora_for_models, tagging the file's dora_scale tensors with its rule first."""
    def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", **kwargs):
        rule = file_metadata(filename).get(RULE_KEY)
        if rule:
            for key, value in lora.items():
                if key.endswith(".dora_scale"):
                    setattr(value, TAG, rule)
        return original(model, clip, lora, strength_model, strength_clip, filename=filename, **kwargs)

    load_lora_for_models.sdtrain_original = original
    return load_lora_for_models


def _patch(owner, name: str, wrapper) -> bool:
    current = getattr(owner, name)
    if getattr(current, "sdtrain_original", None) is None:
        setattr(owner, name, wrapper(current))
        return True
    return False


def install() -> list[str]:
    """Patch the loaded UI's Lora code (idempotent); returns what is patched so far ([] when nothing is loaded yet)."""
    patched = []
    try:
        import backend.patcher.lora as forge_lora
    except ImportError:
        forge_lora = None
    if forge_lora is not None:
        _patch(forge_lora, "weight_decompose", forge_weight_decompose)
        patched.append("Forge backend.patcher.lora.weight_decompose")
        networks = sys.modules.get("networks")
        if networks is not None and hasattr(networks, "load_lora_for_models"):
            _patch(networks, "load_lora_for_models", forge_tagging_loader)
            patched.append("Forge networks.load_lora_for_models (reads sdtrain_dora_scale)")
        return patched
    network = sys.modules.get("network")
    if network is not None and hasattr(getattr(network, "NetworkModule", None), "apply_weight_decompose"):
        _patch(network.NetworkModule, "apply_weight_decompose", a1111_apply_weight_decompose)
        patched.append("A1111 network.NetworkModule.apply_weight_decompose")
    return patched


def install_when_ready(script_callbacks=None) -> None:
    """Patch now, and again when the app starts (in case the Lora extension loads after this one)."""
    def attempt(*_args):
        patched = install()
        complete = len(patched) == 2 or (patched and patched[0].startswith("A1111"))
        if complete and not getattr(install_when_ready, "reported", False):
            print(f"[sdtrain] exact output-axis DoRA: patched {', '.join(patched)}")
            install_when_ready.reported = True
        return complete

    if not attempt() and script_callbacks is not None:
        script_callbacks.on_before_ui(attempt)
        script_callbacks.on_app_started(attempt)
