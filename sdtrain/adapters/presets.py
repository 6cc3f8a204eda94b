"""Target-layer presets: which Linear/Conv2d layers of a UNet or CLIP text encoder get adapters.

Layers are found from the module structure (the class of each block and the attribute names inside it),
so the same rules work on a real model, a tiny one, or one built on the `meta` device.

UNet presets (`network.preset`):
- `attn`: to_q, to_k, to_v, to_out.0 of both attentions of every transformer block;
- `attn-mlp`: + the transformer's proj_in / proj_out and the feed-forward (ff.net.0.proj, ff.net.2);
- `full`: + ResNet conv1, conv2, conv_shortcut, time_emb_proj and the down/up-sampler convolutions.
Text encoders, whatever the preset: self_attn q/k/v/out_proj and mlp fc1/fc2 of every encoder layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# preset name -> the groups of UNet layers it adapts
PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("attn",),
    "attn-mlp": ("attn", "proj", "ff"),
    "full": ("attn", "proj", "ff", "resnet", "sampler"),
}

_ATTN_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
_RESNET_LAYERS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")
_TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def layer_kind(module: nn.Module) -> str | None:
    """"linear" or "conv" for a layer an adapter can wrap, else None."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv"
    return None


def _child(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = module._modules.get(part) if module is not None else None
    return module


def _block_layers(block: nn.Module, groups: tuple[str, ...]) -> list[str]:
    """Relative paths of the targeted layers inside one UNet block, by the block's class."""
    cls = type(block).__name__
    found: list[str] = []
    if cls == "BasicTransformerBlock":
        if "attn" in groups:
            for attn in ("attn1", "attn2"):
                found += [f"{attn}.{name}" for name in _ATTN_LAYERS if _child(block, attn) is not None]
        if "ff" in groups and _child(block, "ff") is not None:
            found += [f"ff.{path}" for path, layer in block.ff.named_modules() if layer_kind(layer)]
    elif cls == "Transformer2DModel" and "proj" in groups:
        found += ["proj_in", "proj_out"]
    elif cls == "ResnetBlock2D" and "resnet" in groups:
        found += list(_RESNET_LAYERS)
    elif cls in ("Downsample2D", "Upsample2D") and "sampler" in groups:
        found += ["conv"]
    return [path for path in found if layer_kind(_child(block, path))]


def unet_preset_paths(unet: nn.Module, preset: str) -> list[str]:
    """Module paths (as in `unet.named_modules()`) of the UNet layers a preset adapts, in model order."""
    groups = PRESETS[preset]
    wanted: set[str] = set()
    for path, block in unet.named_modules():
        prefix = f"{path}." if path else ""
        wanted.update(prefix + rel for rel in _block_layers(block, groups))
    return [path for path, _ in unet.named_modules() if path in wanted]


def text_encoder_paths(text_encoder: nn.Module) -> list[str]:
    """Module paths of the attention and MLP layers of every CLIP encoder layer, in model order."""
    wanted: set[str] = set()
    for path, block in text_encoder.named_modules():
        if type(block).__name__.endswith("EncoderLayer"):
            wanted.update(f"{path}.{rel}" for rel in _TEXT_LAYERS if layer_kind(_child(block, rel)))
    return [path for path, _ in text_encoder.named_modules() if path in wanted]
