"""Batched channel norms of same-shaped DoRA adapters against a float64 dense reference and the unbatched path."""

import copy
import pickle

import pytest
import torch
from torch import nn

from sdtrain.adapters.dora import DoRAConv2d, DoRALinear
from sdtrain.adapters.norm_batch import MAX_BATCHED_WEIGHT, batch_channel_norms
from sdtrain.adapters.inject import NetworkSpec, inject_adapters
from sdtrain.models.tiny import build_tiny_pipeline

FACTORIES = {
    "linear": (lambda: nn.Linear(12, 10), (2, 5, 12)),
    "conv": (lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1), (2, 5, 9, 8)),
}


def dense_inverse_norm(module):
    """1/‖W0 + s·B·A‖ per channel from the dense matrix in float64."""
    w0 = module.base.weight.detach().double()
    a = module.lora_down.weight.detach().double().reshape(module.rank, -1)
    b = module.lora_up.weight.detach().double().reshape(w0.shape[0], module.rank)
    v = w0 + module.scale * (b @ a).reshape(w0.shape)
    if module.axis == "output":
        sq = v.reshape(v.shape[0], -1).square().sum(1)
    else:
        sq = v.transpose(0, 1).reshape(v.shape[1], -1).square().sum(1)
    return sq.rsqrt()


def make_group(kind, axis, count=4, seed=0):
    torch.manual_seed(seed)
    factory, shape = FACTORIES[kind]
    cls = DoRALinear if kind == "linear" else DoRAConv2d
    modules = [cls(factory(), rank=3, alpha=5.0, axis=axis) for _ in range(count)]
    for m in modules:
        with torch.no_grad():
            m.lora_up.weight.normal_(0, 0.3)
            m.magnitude.mul_(1 + 0.3 * torch.rand_like(m.magnitude))
    return modules, torch.randn(shape)


def assert_close(a, b, tol=1e-6):
    a, b = a.detach().double(), b.detach().double()
    assert ((a - b).abs().max() / b.abs().max()).item() <= tol


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_batched_inverse_norms_match_dense_reference(kind, axis):
    modules, _ = make_group(kind, axis)
    batches = batch_channel_norms(modules)
    assert len(batches) == 1 and len(batches[0]) == len(modules)
    for m in modules:
        assert m._norm_batch is batches[0]
        assert_close(m.inverse_norm(), dense_inverse_norm(m))


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_outputs_and_grads_equal_the_unbatched_layers(kind, axis):
    modules, x = make_group(kind, axis)
    twins = copy.deepcopy(modules)  # copies are not batched: each computes its own norm
    batch_channel_norms(modules)
    assert all(t._norm_batch is None or t.inverse_norm() is not None for t in twins)
    for m, t in zip(modules, twins):
        outs = []
        for layer in (m, t):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.numel()).view(y.shape))
            outs.append([y, xi.grad, layer.lora_down.weight.grad, layer.lora_up.weight.grad, layer.magnitude.grad])
        for got, ref in zip(*outs):
            assert_close(got, ref)


def test_an_updated_member_recomputes_and_others_stay_right():
    modules, x = make_group("linear", "output")
    batch_channel_norms(modules)
    before = [m.inverse_norm().clone() for m in modules]
    with torch.no_grad():  # what an optimizer step does: in-place updates
        modules[2].lora_down.weight.add_(0.5)
        modules[3].lora_up.weight.mul_(-2.0)
    for m, old in zip(modules, before):
        assert_close(m.inverse_norm(), dense_inverse_norm(m))
    assert not torch.allclose(modules[2].inverse_norm(), before[2])
    assert torch.equal(modules[0].inverse_norm(), before[0])


def test_cached_values_are_reused_until_something_changes(monkeypatch):
    modules, x = make_group("linear", "input")
    batch, = batch_channel_norms(modules)
    calls = []
    original = type(batch)._compute
    monkeypatch.setattr(type(batch), "_compute", lambda self: calls.append(1) or original(self))
    for _ in range(3):  # e.g. gradient accumulation: A and B unchanged
        for m in modules:
            m(x)
    assert len(calls) == 1
    with torch.no_grad():
        modules[1].lora_up.weight.add_(0.1)
    for m in modules:
        m(x)
    assert len(calls) == 2


def test_base_weight_change_and_merge_are_seen():
    modules, x = make_group("conv", "output")
    batch_channel_norms(modules)
    modules[0].inverse_norm()
    state = modules[1].state_dict()
    state["base.weight"] = torch.randn_like(state["base.weight"])
    modules[1].load_state_dict(state)  # copies into the existing tensor: the version counter moves
    for m in modules:
        assert_close(m.inverse_norm(), dense_inverse_norm(m))
    expected = dense_inverse_norm(modules[2])
    modules[2].merge()  # merged: W0 lives in the saved copy, the base weight holds W'
    assert_close(modules[2].inverse_norm(), expected)
    modules[2].unmerge()
    assert_close(modules[2].inverse_norm(), expected)


def test_copies_and_pickles_compute_their_own_norm():
    modules, x = make_group("linear", "output")
    batch_channel_norms(modules)
    for clone in (copy.deepcopy(modules[0]), pickle.loads(pickle.dumps(modules[0]))):
        assert len(clone._norm_batch) == 0
        with torch.no_grad():
            clone.lora_up.weight.add_(0.2)
        assert_close(clone.inverse_norm(), dense_inverse_norm(clone))
        assert_close(modules[0].inverse_norm(), dense_inverse_norm(modules[0]))


def test_what_is_not_batched():
    torch.manual_seed(0)
    big = [DoRALinear(nn.Linear(300, 300), 4, 4) for _ in range(2)]  # 90,000 > MAX_BATCHED_WEIGHT weights
    assert 300 * 300 > MAX_BATCHED_WEIGHT
    attached = [DoRALinear(nn.Linear(8, 8), 4, 4, detach_norm=False) for _ in range(2)]  # norm needs its gradient
    lora = [DoRALinear(nn.Linear(8, 8), 4, 4, decompose=False) for _ in range(2)]
    single = [DoRALinear(nn.Linear(9, 8), 4, 4)]  # a group of one
    mixed = [DoRALinear(nn.Linear(8, 8), 4, 4), DoRALinear(nn.Linear(8, 8), 2, 2)]  # different ranks
    assert batch_channel_norms(big + attached + lora + single + mixed) == []
    assert all(m._norm_batch is None for m in big + attached + lora + single + mixed)


def test_injected_tiny_model_is_batched_by_shape():
    pipe = build_tiny_pipeline("sdxl")
    spec = NetworkSpec(preset="attn-mlp", rank=4, alpha=4.0)
    adapters = inject_adapters(pipe.unet, None, "sdxl", spec)
    modules = list(adapters.modules.values())
    batched = [m for m in modules if m._norm_batch is not None]
    assert len(batched) == len(modules)  # every tiny layer is small
    for m in modules[:: max(1, len(modules) // 12)]:
        assert_close(m.inverse_norm(), dense_inverse_norm(m))
    shapes = {id(m._norm_batch): tuple(m.base.weight.shape) for m in batched}
    assert len(set(shapes.values())) == len(shapes)  # one batch per shape


@pytest.mark.parametrize("part", ["lora_down", "lora_up", "base"])
def test_members_moved_to_another_device_fall_back_to_their_own_norm(part):
    modules, x = make_group("linear", "output", count=3)
    batch_channel_norms(modules)
    getattr(modules[2], part).to("meta")  # one member's tensor elsewhere: the group can no longer be stacked
    reference = copy.deepcopy(modules[0])
    assert reference._norm_batch is not None and len(reference._norm_batch) == 0
    assert_close(modules[0](x), reference(x))
    assert len(modules[0]._norm_batch) == 0  # the batch gave up: every member computes its own norm
    assert_close(modules[0].inverse_norm(), dense_inverse_norm(modules[0]))
