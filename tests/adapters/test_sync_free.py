"""A training step with DoRA/LoRA adapters reads no tensor value on the host (no device synchronization on a GPU)."""

import pytest
import torch

from sdtrain.adapters.inject import NetworkSpec, inject_adapters
from sdtrain.models.tiny import build_tiny_pipeline
from helpers_sync import count_syncs


def adapted_unet(axis, kind="dora", detach_norm=True):
    torch.manual_seed(0)
    pipe = build_tiny_pipeline("sd15")
    spec = NetworkSpec(type=kind, rank=4, preset="full", decompose_axis=axis, detach_norm=detach_norm,
                       train_text_encoder=True)
    adapters = inject_adapters(pipe.unet, [pipe.text_encoder], "sd15", spec)
    return pipe, adapters


def step(pipe, adapters, optimizer):
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407, 49407]])
    context = pipe.text_encoder(ids).last_hidden_state
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    pred = pipe.unet(sample, torch.tensor([10]), context).sample
    pred.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("axis,kind,detach_norm",
                         [("output", "dora", True), ("input", "dora", True), ("output", "dora", False),
                          ("output", "lora", True)])
def test_adapter_training_step_makes_no_sync(axis, kind, detach_norm):
    """Forward, backward and a fused AdamW step of a UNet and text encoder with adapters on every layer kind."""
    pipe, adapters = adapted_unet(axis, kind, detach_norm)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-3, fused=True)
    step(pipe, adapters, optimizer)  # first step: optimizer state
    with count_syncs() as calls:
        step(pipe, adapters, optimizer)
        step(pipe, adapters, optimizer)
    assert not calls, "".join(f"{name}:\n{stack}" for name, _, stack in calls[:3])


def test_default_adamw_reads_only_its_host_step_counters():
    """torch AdamW's default (for-each on CUDA) reads its `step` counters with .item(): they stay on the host
    even when the parameters are on a GPU, so these reads wait for nothing; the counter sees them."""
    pipe, adapters = adapted_unet("output")
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-3)
    step(pipe, adapters, optimizer)
    steps = {id(state["step"]) for state in optimizer.state.values()}
    with count_syncs(ignore=lambda name, t: name == "item" and id(t) in steps) as calls:
        step(pipe, adapters, optimizer)
    assert not calls
    with count_syncs() as calls:
        step(pipe, adapters, optimizer)
    assert len(calls) == len(steps) and all(t.device.type == "cpu" and t.dim() == 0 for _, t, _ in calls)


def test_counter_sees_syncs():
    x = torch.ones(3)
    with count_syncs() as calls:
        x.sum().item()
        bool(x.any())
        float(x[0])
        x.tolist()
        torch.cuda.synchronize()
    assert [name for name, _, _ in calls] == ["item", "__bool__", "__float__", "tolist", "torch.cuda.synchronize"]
    assert x.sum().item() == 3.0  # restored
