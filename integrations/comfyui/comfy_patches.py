"""ComfyUI glue of "Load DoRA (sdtrain, exact)": ComfyUI's own LoRA loading, with exact DoRA where ComfyUI is not.

The file is read and matched to model keys exactly as ComfyUI's LoraLoader does (`comfy.lora.model_lora_keys_*`,
`comfy.lora_convert.convert_lora`, `comfy.lora.load_lora`), so every key format ComfyUI knows (sdtrain, kohya,
LyCORIS, OneTrainer, diffusers names) is placed the same way. Each DoRA module whose rebuild by the installed
ComfyUI would differ from the DoRA formula gets an `SdtrainDoRAAdapter` instead: a `comfy.weight_adapter`
LoRAAdapter with exact math (`exact_dora.apply_patch`). Modules ComfyUI already computes exactly (plain LoRA,
input-axis 2-D dora_scale, and output-axis files whose rule matches the installed ComfyUI's) keep ComfyUI's own
adapter. The patches go through `ModelPatcher.add_patches`, so ComfyUI's patching, low-VRAM on-the-fly weights,
offloading and unpatching apply to them as to any LoRA; an adapter holds only the file's low-rank tensors.

Which output-axis rule the installed ComfyUI follows is measured, not assumed: `output_axis_rule()` runs its
`weight_decompose` on a 2×2 example (v0.3.64 divides by ‖W0‖: "w0-norm"; with the upstream fix: "merged-norm").
"""

from __future__ import annotations

import json
import logging

from . import exact_dora

_ADAPTER_CLASS = None
_OUTPUT_RULE: list = []  # memo of output_axis_rule()


def output_axis_rule() -> str | None:
    """How the installed ComfyUI normalises output-axis DoRA: "w0-norm", "merged-norm", or None (unknown)."""
    if _OUTPUT_RULE:
        return _OUTPUT_RULE[0]
    import torch

    rule = None
    try:
        from comfy.weight_adapter.base import weight_decompose

        w0 = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
        diff = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        scale = torch.ones(2, 1)
        result = weight_decompose(scale, w0.clone(), diff.clone(), 1.0, 1.0, torch.float32, lambda a: a)
        merged = w0 + diff
        for name, norm_of in (("w0-norm", w0), ("merged-norm", merged)):
            if torch.allclose(result, merged / exact_dora.channel_norm(norm_of, "output"), rtol=1e-5, atol=1e-6):
                rule = name
    except Exception as err:  # an older or newer ComfyUI without this function: use the exact adapter everywhere
        logging.info(f"sdtrain: could not probe ComfyUI's DoRA rule ({err}); every DoRA module uses the exact path")
    _OUTPUT_RULE.append(rule)
    return rule


def comfyui_is_exact(dora_scale_shape, weight_shape, axis: str, rule: str, comfy_rule: str | None) -> bool:
    """Whether ComfyUI's own LoRAAdapter rebuilds this DoRA module exactly.

    ComfyUI picks the output branch when dora_scale.shape[0] == out and broadcasts dora_scale against a norm of the
    weight's rank, so only the canonical 2-D+ shapes are safe ([1, in, 1, 1] / [out, 1, 1, 1] for a conv).
    """
    shape, ndim, out_features = tuple(dora_scale_shape), len(weight_shape), weight_shape[0]
    if len(shape) != ndim or out_features == 1:
        return False
    if axis == "input":
        return shape[0] == 1
    wanted = "w0-norm" if rule == exact_dora.W0_NORM_RULE else "merged-norm"
    return shape[0] == out_features and comfy_rule == wanted


def adapter_class():
    """`SdtrainDoRAAdapter`: ComfyUI's LoRAAdapter with the exact DoRA merge (defined once ComfyUI is importable)."""
    global _ADAPTER_CLASS
    if _ADAPTER_CLASS is not None:
        return _ADAPTER_CLASS
    import torch
    from comfy.weight_adapter.lora import LoRAAdapter

    class SdtrainDoRAAdapter(LoRAAdapter):
        name = "sdtrain_dora"

        def __init__(self, loaded_keys, weights, axis: str, rule: str):
            super().__init__(loaded_keys, weights)
            self.axis, self.rule = axis, rule

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            up, down, alpha, _mid, dora_scale, _reshape = self.weights
            try:
                return exact_dora.apply_patch(weight, up, down, alpha, dora_scale, strength, self.axis, self.rule,
                                              function)
            except Exception as err:
                logging.error(f"sdtrain: DoRA patch of {key} failed: {err}")
                return weight

    _ADAPTER_CLASS = SdtrainDoRAAdapter
    return _ADAPTER_CLASS


def _axis_hint(metadata: dict) -> str | None:
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except (TypeError, json.JSONDecodeError):
        return None
    value = str(args.get("wd_on_output", "")).lower() if isinstance(args, dict) else ""
    return {"true": "output", "false": "input"}.get(value)


def _weight_shape(key, roots, implied):
    import comfy.utils

    name = key if isinstance(key, str) else key[0]
    for root in roots:
        try:
            return tuple(comfy.utils.get_attr(root, name).shape)
        except AttributeError:
            continue
    return implied


def exact_patches(lora: dict, metadata: dict, key_map: dict, roots) -> tuple[dict, dict]:
    """ComfyUI's patches for a LoRA/DoRA state dict, with `SdtrainDoRAAdapter` where ComfyUI's rule is inexact.

    Returns (patches by model key, counts: "comfyui" DoRA modules on ComfyUI's path, "exact" on the exact path,
    "lora" plain LoRA modules, "other" patches of other kinds).
    """
    import comfy.lora
    import comfy.lora_convert
    from comfy.weight_adapter.lora import LoRAAdapter

    rule = (metadata or {}).get("sdtrain_dora_scale") or exact_dora.MAGNITUDE
    hint = _axis_hint(metadata or {})
    comfy_rule = output_axis_rule()
    cls = adapter_class()
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    counts = {"comfyui": 0, "exact": 0, "lora": 0, "other": 0}
    for key, patch in list(loaded.items()):
        if not isinstance(patch, LoRAAdapter):
            counts["other"] += 1
            continue
        up, down, _alpha, mid, dora_scale, _reshape = patch.weights
        if dora_scale is None:
            counts["lora"] += 1
            continue
        implied = (up.shape[0], down.shape[1], *down.shape[2:])
        shape = _weight_shape(key, roots, implied)
        if mid is not None or not isinstance(key, str):
            counts["comfyui"] += 1  # LoCon mid weights / offset patches: ComfyUI's own path
            continue
        try:
            axis = exact_dora.dora_axis(dora_scale.shape, shape, hint)
        except ValueError as err:
            logging.warning(f"sdtrain: {key}: {err}; left to ComfyUI's own LoRA code")
            counts["comfyui"] += 1
            continue
        if comfyui_is_exact(dora_scale.shape, shape, axis, rule, comfy_rule):
            counts["comfyui"] += 1
            continue
        loaded[key] = cls(patch.loaded_keys, patch.weights, axis, rule)
        counts["exact"] += 1
    return loaded, counts


def load_dora_for_models(model, clip, lora: dict, metadata: dict, strength_model: float, strength_clip: float):
    """`comfy.sd.load_lora_for_models` with exact DoRA: clones MODEL and CLIP and adds the patches to them."""
    import comfy.lora

    key_map, roots = {}, []
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
        roots.append(model.model)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        roots.append(clip.cond_stage_model)
    patches, counts = exact_patches(lora, metadata, key_map, roots)
    new_model, new_clip, applied = None, None, set()
    if model is not None:
        new_model = model.clone()
        applied.update(new_model.add_patches(patches, strength_model))
    if clip is not None:
        new_clip = clip.clone()
        applied.update(new_clip.add_patches(patches, strength_clip))
    missing = [key for key in patches if key not in applied]
    for key in missing:
        logging.warning(f"sdtrain: NOT LOADED {key}")
    summary = (f"{len(applied)} modules: {counts['exact']} DoRA on the exact path, {counts['comfyui']} DoRA and "
               f"{counts['lora']} LoRA on ComfyUI's own path (its output-axis rule: {output_axis_rule() or 'unknown'})")
    return new_model, new_clip, summary
