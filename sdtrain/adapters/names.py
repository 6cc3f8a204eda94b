"""kohya adapter names (as used by kohya sd-scripts, LyCORIS, ComfyUI and A1111) and where they live.

UNet: `lora_unet_` + the module path with `.` → `_`; the path is diffusers' for SD1.x/SD2.x
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`) but the original LDM one for SDXL
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_input_blocks_3_0_op`).
Text encoders: `lora_te_` (SD1.x/SD2.x) or `lora_te1_` / `lora_te2_` (SDXL) + the Hugging Face CLIP path,
always with its `text_model_` prefix (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`).

Turning `_` back into `.` is ambiguous (`to_out_0`, `attn1_to_q`), so names are resolved through an index
built from the model's modules (`module_index`), or from the released UNet structure when no model is at hand.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Mapping, Sequence

from torch import nn

from sdtrain.models import ldm_layout

COMPONENTS = ("unet", "te1", "te2")
UNET_PREFIX = "lora_unet_"
# Adapter-name prefix per (architecture, component).
PREFIXES: dict[str, dict[str, str]] = {
    "sd15": {"unet": UNET_PREFIX, "te1": "lora_te_"},
    "sd2": {"unet": UNET_PREFIX, "te1": "lora_te_"},
    "sdxl": {"unet": UNET_PREFIX, "te1": "lora_te1_", "te2": "lora_te2_"},
}
GROUPS: dict[str, tuple[str, ...]] = {arch: tuple(p) for arch, p in PREFIXES.items()}
# Longest first so that `lora_te1_` is not read as `lora_te_`.
_PARSE = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"))
ADAPTABLE_TYPES = (nn.Linear, nn.Conv2d)
# Released text-encoder widths, used to slice OpenCLIP's fused q/k/v when no width is given.
OPENCLIP_WIDTH = {"sd2": 1024, "sdxl": 1280}


def _check(arch: str, component: str) -> str:
    if arch not in PREFIXES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {tuple(PREFIXES)}")
    if component not in PREFIXES[arch]:
        raise ValueError(f"{arch} has no component {component!r}; expected one of {GROUPS[arch]}")
    return PREFIXES[arch][component]


def kohya_name(arch: str, component: str, module_path: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """kohya name of a module given by its path in our (diffusers / transformers) model."""
    prefix = _check(arch, component)
    if component == "unet":
        if arch == "sdxl":
            config = unet_config or ldm_layout.REFERENCE_UNET_CONFIGS["sdxl"]
            module_path = ldm_layout.unet_to_ldm_module(module_path, config)
        return prefix + module_path.replace(".", "_")
    return prefix + ldm_layout.hf_clip_key(module_path).replace(".", "_")


def parse_kohya_name(name: str) -> tuple[str, str]:
    """(component, rest) of a kohya name; anything after the first `.` (a tensor suffix) is dropped."""
    name = name.split(".", 1)[0]
    for prefix, component in _PARSE:
        if name.startswith(prefix):
            return component, name[len(prefix):]
    raise ValueError(f"{name!r} is not a kohya adapter name (expected lora_unet_, lora_te_, lora_te1_ or lora_te2_)")


def adaptable_modules(module: nn.Module):
    """(path, module) of every Linear / Conv2d inside `module`."""
    return [(path, m) for path, m in module.named_modules() if isinstance(m, ADAPTABLE_TYPES)]


def module_index(
    arch: str,
    unet: nn.Module | None = None,
    text_encoders: Sequence[nn.Module] = (),
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, tuple[str, str]]:
    """kohya name → (component, module path in our model) for every Linear / Conv2d of the given models."""
    index: dict[str, tuple[str, str]] = {}
    parts: list[tuple[str, nn.Module]] = []
    if unet is not None:
        parts.append(("unet", unet))
        unet_config = unet_config or getattr(unet, "config", None)
    parts += list(zip(("te1", "te2"), text_encoders))
    for component, model in parts:
        for path, _ in adaptable_modules(model):
            name = kohya_name(arch, component, path, unet_config)
            if name in index:
                raise ValueError(f"two modules share the kohya name {name}: {index[name]} and {(component, path)}")
            index[name] = (component, path)
    return index


def diffusers_module_for(arch: str, name: str, index: Mapping[str, tuple[str, str]]) -> tuple[str, str]:
    """(component, module path) of a kohya name, looked up in `module_index(...)` of the target model."""
    key = name.split(".", 1)[0]
    if key not in index:
        component, _ = parse_kohya_name(key)
        raise KeyError(f"adapter module {key} ({component}) does not match any layer of this {arch} model")
    return index[key]


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=list)


@lru_cache(maxsize=8)
def _unet_index(arch: str, config_json: str) -> dict[str, str]:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config_json))
    config = json.loads(config_json)
    return {kohya_name(arch, "unet", path, config): path for path, _ in adaptable_modules(unet)}


def unet_module_for(arch: str, name: str, unet_config: Mapping[str, Any] | None = None) -> str:
    """Diffusers UNet module path of a `lora_unet_*` name, from the UNet structure alone (no weights)."""
    config = unet_config or ldm_layout.REFERENCE_UNET_CONFIGS[arch]
    component, _ = parse_kohya_name(name)
    if component != "unet":
        raise ValueError(f"{name} is not a UNet adapter name")
    table = _unet_index(arch, _config_key(config))
    key = name.split(".", 1)[0]
    if key not in table:
        raise KeyError(f"adapter module {key} does not match any layer of the {arch} UNet")
    return table[key]


_TE_MODULE = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc1|mlp_fc2)")


def text_module_for(name: str) -> str:
    """Hugging Face CLIP module path (with `text_model.`) of a `lora_te*` name."""
    component, rest = parse_kohya_name(name)
    if component == "unet":
        raise ValueError(f"{name} is not a text-encoder adapter name")
    if rest == "text_projection":
        return "text_projection"
    match = _TE_MODULE.fullmatch(rest)
    if not match:
        raise KeyError(f"adapter module {name} does not match a CLIP text-encoder layer")
    layer, module = match.groups()
    module = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
              "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
              "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}[module]
    return f"text_model.encoder.layers.{layer}.{module}"


def checkpoint_key(
    arch: str,
    name: str,
    unet_config: Mapping[str, Any] | None = None,
    *,
    clip_width: int | None = None,
) -> tuple[str, slice | None]:
    """(single-file weight key, row slice or None) holding the weight a kohya name adapts.

    OpenCLIP text encoders (SD2, SDXL's CLIP-G) fuse q/k/v into `attn.in_proj_weight`; the slice picks the rows
    (`clip_width` = that encoder's hidden size, default the released 1024 / 1280).
    `text_projection` is stored transposed in OpenCLIP files and is not mapped (ValueError).
    """
    component, _ = parse_kohya_name(name)
    _check(arch, component)
    if component == "unet":
        config = unet_config or ldm_layout.REFERENCE_UNET_CONFIGS[arch]
        path = unet_module_for(arch, name, config)
        return f"{ldm_layout.UNET_PREFIX}{ldm_layout.unet_to_ldm_module(path, config)}.weight", None
    prefix, layout = ldm_layout.TEXT_ENCODER_LAYOUT[arch][0 if component == "te1" else 1]
    hf_key = text_module_for(name) + ".weight"
    if layout == "hf":
        return prefix + hf_key, None
    key, chunk, transposed = ldm_layout.openclip_key(hf_key)
    if transposed:
        raise ValueError(f"{name}: OpenCLIP stores text_projection transposed; it has no direct checkpoint slice")
    if chunk is None:
        return prefix + key, None
    width = clip_width or OPENCLIP_WIDTH[arch]
    return prefix + key, slice(chunk * width, (chunk + 1) * width)
