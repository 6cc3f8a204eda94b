"""A UNet with DoRA adapters (both axes, linear and conv layers) under torch.compile matches eager mode."""

import pytest
import torch

from sdtrain.adapters.dora import DoRAConv2d, DoRALinear
from sdtrain.adapters.inject import NetworkSpec, inject_adapters

# A UNet of one cross-attention down and up block (ResNets, transformer blocks with self- and cross-attention and
# feed-forward, 1×1 and 3×3 convs): compilation time grows with the number of ops, not with their size.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
            norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2)


def adapted_unet():
    """The UNet with output-axis DoRA on its attention and feed-forward layers and input-axis DoRA on the rest
    (convs, proj_in/out, the time embedding), with random non-initial adapter weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    adapters = inject_adapters(unet, None, "sd15", NetworkSpec(rank=2, preset="full"))
    for name, module in list(adapters.modules.items()):
        if "attn" not in name and "_ff_" not in name:
            cls = DoRALinear if isinstance(module, DoRALinear) else DoRAConv2d
            replacement = cls(module.base, module.rank, module.alpha, axis="input")
            component, path = adapters.module_paths[name]
            parent, _, attr = path.rpartition(".")
            setattr(unet.get_submodule(parent), attr, replacement)
            adapters.modules[name] = replacement
    with torch.no_grad():
        for module in adapters.modules.values():
            module.lora_up.weight.normal_(0, 0.2)
            module.magnitude.mul_(1 + 0.2 * torch.rand_like(module.magnitude))
    return unet, adapters


def output_and_grads(model, adapters):
    """The UNet's output on fixed inputs and the adapter gradients of a fixed random projection of it."""
    gen = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    for p in adapters.parameters():
        p.grad = None
    y = model(sample, torch.tensor([10, 500]), context).sample
    (y * torch.randn(y.shape, generator=gen)).sum().backward()
    return y.detach(), [p.grad.clone() for p in adapters.parameters()]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_unet_with_dora_matches_eager():
    """One graph (fullgraph: no break) for the forward and one for the backward, compiled by inductor (C++ kernels
    on the CPU); outputs and adapter gradients match eager mode, also after the adapter weights change."""
    unet, adapters = adapted_unet()
    axes = {module.axis for module in adapters.modules.values()}
    kinds = {type(module) for module in adapters.modules.values() if module.axis == "input"}
    assert axes == {"output", "input"} and kinds == {DoRALinear, DoRAConv2d}
    torch._dynamo.reset()
    assert adapters.compile("unet", fullgraph=True) is unet
    for update in range(2):
        if update:  # as an optimizer step does: the compiled graph computes the new channel norms
            with torch.no_grad():
                for p in adapters.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        expected, expected_grads = output_and_grads(unet.forward, adapters)  # .forward: eager
        y, grads = output_and_grads(unet, adapters)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
        for g, g_ref in zip(grads, expected_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())
