"""Explicit diffusers ↔ original LDM/SGM key layout for SD1.x, SD2.x and SDXL single-file checkpoints.

Written from the architecture, computed from the UNet/VAE config, so it holds for the tiny test models and the
real ones alike.

UNet (`model.diffusion_model.`): `input_blocks.0.0` is `conv_in`; each down level contributes
`layers_per_block` entries `input_blocks.K` (`.0` ResNet, `.1` SpatialTransformer on cross-attention levels)
then, except on the last level, one down-sampler `input_blocks.K.0.op`. `middle_block.0/1/2` are
ResNet/attention/ResNet. Each up level contributes `layers_per_block + 1` entries `output_blocks.K`
(`.0` ResNet, `.1` attention) and, except on the last level, an up-sampler on its last entry
(`output_blocks.K.1.conv`, or `.2.conv` after an attention). Inside ResNets diffusers' `norm1, conv1,
time_emb_proj, norm2, conv2, conv_shortcut` are `in_layers.0, in_layers.2, emb_layers.1, out_layers.0,
out_layers.3, skip_connection`; attention internals keep their names. `time_embed.0/2`, SDXL's
`label_emb.0.0/0.2` and `out.0/2` hold the time/added embeddings and the output norm/conv.

VAE (`first_stage_model.`): `encoder.down.N.block.M`, `encoder.down.N.downsample.conv`, `decoder.up.N` counted
from the bottom (diffusers' `up_blocks.0` is LDM `up.{levels-1}`), `mid.block_1/block_2`, `mid.attn_1`
(`norm, q, k, v, proj_out`, stored as 1×1 convolutions), `norm_out`, `nin_shortcut`, `quant_conv`.

Text encoders: Hugging Face CLIP layout (`text_model.` always present in the file, even though transformers 5
`CLIPTextModel` state dicts drop it) under `cond_stage_model.transformer.` (SD1) or
`conditioner.embedders.0.transformer.` (SDXL CLIP-L); OpenCLIP layout under `cond_stage_model.model.` (SD2) or
`conditioner.embedders.1.model.` (SDXL CLIP-G): `transformer.resblocks.N.attn.in_proj_weight/bias` stacking
q, k, v rows, `attn.out_proj`, `ln_1`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `token_embedding.weight`,
`positional_embedding`, `ln_final`, and `text_projection` stored transposed (x @ text_projection).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Per architecture: (prefix, layout) of each text encoder, in pipeline order.
TEXT_ENCODER_LAYOUT = {
    "sd15": (("cond_stage_model.transformer.", "hf"),),
    "sd2": (("cond_stage_model.model.", "openclip"),),
    "sdxl": (("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip")),
}
ARCHS = tuple(TEXT_ENCODER_LAYOUT)

# Structure of the released UNets (enough to build them on the meta device and to name their modules).
_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
)
REFERENCE_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(_SD_BLOCKS, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(
        _SD_BLOCKS, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
    "sdxl": dict(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        upcast_attention=False,
    ),
}

# ---------------------------------------------------------------------------------------------------- UNet

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET, _ATTENTION, _LEAF = "resnet", "attention", "leaf"


def _per_block(value, n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _structure(unet_config: Mapping[str, Any]) -> tuple:
    layers = unet_config["layers_per_block"]
    return (
        tuple(unet_config["down_block_types"]),
        tuple(unet_config["up_block_types"]),
        layers if isinstance(layers, int) else tuple(layers),
        unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
    )


def unet_block_map(unet_config: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """diffusers block path → (LDM block path, kind) for every ResNet, attention and sampler of the UNet."""
    return dict(_block_map(_structure(unet_config)))


@lru_cache(maxsize=16)
def _block_map(structure: tuple) -> tuple:
    down, up, layers, mid_type = structure
    layers = _per_block(layers, len(down))
    blocks: dict[str, tuple[str, str]] = {}
    k = 1
    for i, block_type in enumerate(down):
        for j in range(layers[i]):
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", _RESNET)
            if "CrossAttn" in block_type:
                blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", _ATTENTION)
            k += 1
        if i < len(down) - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", _LEAF)
            k += 1
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unsupported UNet mid block {mid_type!r}: only UNetMidBlock2DCrossAttn is mapped to LDM")
    blocks["mid_block.resnets.0"] = ("middle_block.0", _RESNET)
    blocks["mid_block.attentions.0"] = ("middle_block.1", _ATTENTION)
    blocks["mid_block.resnets.1"] = ("middle_block.2", _RESNET)
    k = 0
    for i, (block_type, n) in enumerate(zip(up, reversed(layers))):
        attention = "CrossAttn" in block_type
        for j in range(n + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{k}.0", _RESNET)
            if attention:
                blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{k}.1", _ATTENTION)
            if j == n and i < len(up) - 1:
                blocks[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{k}.{2 if attention else 1}.conv", _LEAF)
            k += 1
    return tuple(blocks.items())


def _split_block(path: str, blocks: Mapping[str, Any]) -> tuple[str, str]:
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in blocks:
            return head, ".".join(parts[n:])
    raise KeyError(path)


def unet_to_ldm_module(path: str, unet_config: Mapping[str, Any]) -> str:
    """LDM module path of a diffusers UNet module path (`down_blocks.1.attentions.0...` → `input_blocks.4.1...`)."""
    if path in _UNET_TOP:
        return _UNET_TOP[path]
    blocks = unet_block_map(unet_config)
    try:
        head, rest = _split_block(path, blocks)
    except KeyError:
        raise KeyError(f"UNet module {path!r} has no LDM equivalent") from None
    ldm, kind = blocks[head]
    if not rest:
        return ldm
    if kind == _ATTENTION:
        return f"{ldm}.{rest}"
    if kind == _RESNET and rest in _UNET_RESNET:
        return f"{ldm}.{_UNET_RESNET[rest]}"
    raise KeyError(f"UNet module {path!r} has no LDM equivalent")


def ldm_to_unet_module(path: str, unet_config: Mapping[str, Any]) -> str:
    """Inverse of `unet_to_ldm_module`."""
    top = {v: k for k, v in _UNET_TOP.items()}
    if path in top:
        return top[path]
    inverse = {ldm: (diffusers, kind) for diffusers, (ldm, kind) in unet_block_map(unet_config).items()}
    try:
        head, rest = _split_block(path, inverse)
    except KeyError:
        raise KeyError(f"LDM UNet module {path!r} has no diffusers equivalent") from None
    diffusers, kind = inverse[head]
    if not rest:
        return diffusers
    if kind == _ATTENTION:
        return f"{diffusers}.{rest}"
    resnet = {v: k for k, v in _UNET_RESNET.items()}
    if kind == _RESNET and rest in resnet:
        return f"{diffusers}.{resnet[rest]}"
    raise KeyError(f"LDM UNet module {path!r} has no diffusers equivalent")


def _map_param_key(key: str, module_fn) -> str:
    module, param = key.rsplit(".", 1)
    return f"{module_fn(module)}.{param}"


def unet_to_ldm_key(key: str, unet_config: Mapping[str, Any]) -> str:
    """LDM state-dict key (without `model.diffusion_model.`) of a diffusers UNet state-dict key."""
    return _map_param_key(key, lambda m: unet_to_ldm_module(m, unet_config))


# ---------------------------------------------------------------------------------------------------- VAE

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_PATTERNS = (
    (re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"), "resnet", "encoder.down.{0}.block.{1}"),
    (re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv"), None, "encoder.down.{0}.downsample.conv"),
    (re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"), "resnet", "decoder.up.{0}.block.{1}"),
    (re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv"), None, "decoder.up.{0}.upsample.conv"),
    (re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)"), "resnet", "{0}.mid.block_{1}"),
    (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)"), "attention", "{0}.mid.attn_1"),
)


def vae_to_ldm_module(path: str, vae_config: Mapping[str, Any]) -> str:
    """LDM module path (without `first_stage_model.`) of a diffusers AutoencoderKL module path."""
    if path in _VAE_TOP:
        return _VAE_TOP[path]
    levels = len(vae_config["up_block_types"])
    for pattern, kind, template in _VAE_PATTERNS:
        match = pattern.fullmatch(path)
        if not match:
            continue
        groups = list(match.groups())
        if path.startswith("decoder.up_blocks."):
            groups[0] = str(levels - 1 - int(groups[0]))  # LDM numbers decoder levels from the bottom
        if template.startswith("{0}.mid.block_"):
            groups[1] = str(int(groups[1]) + 1)
        table = _VAE_RESNET if kind == "resnet" else _VAE_ATTENTION if kind == "attention" else None
        if table is None:
            return template.format(*groups)
        rest = groups[-1]
        if rest in table:
            return f"{template.format(*groups[:-1])}.{table[rest]}"
    raise KeyError(f"VAE module {path!r} has no LDM equivalent")


def vae_to_ldm_key(key: str, vae_config: Mapping[str, Any]) -> str:
    return _map_param_key(key, lambda m: vae_to_ldm_module(m, vae_config))


def is_vae_attention_projection(ldm_key: str) -> bool:
    """LDM stores the VAE mid-block q/k/v/proj_out as 1×1 convolutions (diffusers: Linear)."""
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key) is not None


# ---------------------------------------------------------------------------------------------------- text encoders

def hf_clip_key(key: str) -> str:
    """Hugging Face CLIP key with the `text_model.` prefix that checkpoints keep (transformers 5 drops it)."""
    if key.startswith(("text_model.", "text_projection")):
        return key
    return "text_model." + key


_OPENCLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_OPENCLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
}


def openclip_key(hf_key: str) -> tuple[str, int | None, bool]:
    """(OpenCLIP key, q/k/v chunk index of a fused `in_proj` or None, stored transposed) for a HF CLIP key."""
    key = hf_clip_key(hf_key)
    if key in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[key], None, key == "text_projection.weight"
    match = _OPENCLIP_LAYER.fullmatch(key)
    if match:
        layer, rest = match.groups()
        module, param = rest.rsplit(".", 1)
        base = f"transformer.resblocks.{layer}"
        if module.startswith("self_attn.") and module[len("self_attn."):] in _QKV:
            return f"{base}.attn.in_proj_{param}", _QKV[module[len("self_attn."):]], False
        if module in _OPENCLIP_LAYER_PARTS:
            return f"{base}.{_OPENCLIP_LAYER_PARTS[module]}.{param}", None, False
    raise KeyError(f"CLIP text encoder key {hf_key!r} has no OpenCLIP equivalent")


def _hf_text_state_dict(state: Mapping[str, torch.Tensor], prefix: str, position_ids: bool) -> dict[str, torch.Tensor]:
    out = {prefix + hf_clip_key(k): v for k, v in state.items()}
    pos = prefix + "text_model.embeddings.position_embedding.weight"
    if position_ids and pos in out:  # released SD1/SDXL files carry this buffer
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(out[pos].shape[0]).unsqueeze(0)
    return out


def _openclip_state_dict(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        target, chunk, transposed = openclip_key(key)
        if chunk is not None:
            fused.setdefault(target, [None, None, None])[chunk] = value
        else:
            out[prefix + target] = value.t().contiguous() if transposed else value
    for target, parts in fused.items():
        if any(p is None for p in parts):
            raise KeyError(f"incomplete q/k/v projections for {target}")
        out[prefix + target] = torch.cat(parts, dim=0)
    return out


# ---------------------------------------------------------------------------------------------------- whole model

def ldm_noise_schedule_buffers(scheduler_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers an SD1/SD2 LatentDiffusion checkpoint carries (`betas`, `alphas_cumprod`, ...)."""
    from diffusers import DDPMScheduler

    betas = DDPMScheduler.from_config(dict(scheduler_config)).betas.double()
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - prev) * alphas.sqrt() / (1.0 - cumprod),
    }
    return {k: v.float() for k, v in buffers.items()}


def components_to_single_file_state_dict(
    arch: str,
    unet,
    vae,
    text_encoders,
    scheduler_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Single-file (LDM/SGM) state dict of a UNet, VAE and text encoders; no `model_ema` copy.

    SD1/SD2 files also get the DDPM schedule buffers when `scheduler_config` is given.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
    layouts = TEXT_ENCODER_LAYOUT[arch]
    if len(text_encoders) != len(layouts):
        raise ValueError(f"{arch} has {len(layouts)} text encoder(s), got {len(text_encoders)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + unet_to_ldm_key(key, unet.config)] = value
    for key, value in vae.state_dict().items():
        ldm = vae_to_ldm_key(key, vae.config)
        if is_vae_attention_projection(ldm) and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + ldm] = value
    for encoder, (prefix, layout) in zip(text_encoders, layouts):
        state = encoder.state_dict()
        if layout == "hf":
            out.update(_hf_text_state_dict(state, prefix, position_ids=True))
        else:
            out.update(_openclip_state_dict(state, prefix))
    if scheduler_config is not None and arch in ("sd15", "sd2"):
        out.update(ldm_noise_schedule_buffers(scheduler_config))
    result = {}
    for key, value in out.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        result[key] = value.contiguous()
    return result


def pipeline_text_encoders(pipe) -> list:
    encoders = [pipe.text_encoder]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append(pipe.text_encoder_2)
    return encoders


def pipeline_to_single_file_state_dict(pipe, arch: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Single-file (LDM/SGM) state dict of a diffusers SD/SDXL pipeline."""
    scheduler = getattr(pipe, "scheduler", None)
    return components_to_single_file_state_dict(
        arch,
        pipe.unet,
        pipe.vae,
        pipeline_text_encoders(pipe),
        scheduler_config=None if scheduler is None else scheduler.config,
        dtype=dtype,
    )
