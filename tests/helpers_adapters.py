"""Helpers for tests on tiny pipelines with adapters: text encoders, fixed-input outputs, module kinds."""

from __future__ import annotations

import torch

# a few 3x3 convolutions on top of the attention (+ 1x1 proj_in/out on SD1.5) layers
CONVS = "re:(down_blocks_0_resnets_0_conv1|input_blocks_1_0_in_layers_2|input_blocks_4_0_in_layers_2)$"


def encoders(pipe):
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])


@torch.no_grad()
def outputs(pipe, arch):
    """UNet and text-encoder outputs on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    unet = pipe.unet
    context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if arch == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=gen),
                                       "time_ids": torch.randn(1, 6, generator=gen)}
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    result = [unet(sample, 10, context, **kwargs).sample]
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407, 49407]])
    result += [te(ids).last_hidden_state for te in encoders(pipe)]
    return result


def module_kinds(adapter_file):
    """{(group, "linear" | "convKxK")} of an adapter file's modules."""
    found = set()
    for module in adapter_file.modules.values():
        shape = module.weight_shape
        found.add((module.group, "linear" if len(shape) == 2 else f"conv{shape[2]}x{shape[3]}"))
    return found


@torch.no_grad()
def randomize(modules, up_std: float, magnitude_spread: float, down_std: float | None = None) -> None:
    """Random adapter weights from the current torch seed: lora_down ~ N(0, down_std) when given,
    lora_up ~ N(0, up_std), magnitude scaled by 1 + magnitude_spread · N(0, 1) (when the module has one)."""
    for module in modules:
        if down_std is not None:
            module.lora_down.weight.normal_(0, down_std)
        module.lora_up.weight.normal_(0, up_std)
        if module.magnitude is not None:
            module.magnitude.mul_(1 + magnitude_spread * torch.randn_like(module.magnitude))
