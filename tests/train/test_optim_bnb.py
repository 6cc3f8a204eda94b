"""The grouped small-tensor update of the bitsandbytes Adam optimizers against stock bitsandbytes, bit for bit."""

import copy
import io

import bitsandbytes as bnb
import pytest
import torch

from sdtrain.train.optim import build_optimizer, optimizer_class

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

SHAPES = [(8, 8), (64, 64), (3, 7, 1, 1), (40,), (5000,), (16, 320)]  # 64·64 and 5000 elements: 8-bit state


def make_params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]


def groups_of(params):
    return [{"params": params[:3], "lr": 1e-2, "name": "unet"}, {"params": params[3:], "lr": 3e-3, "name": "te1"}]


def run(opt, params, steps, seed, skip=()):
    """`steps` optimizer steps with seeded random gradients; parameters listed in `skip` get no gradient then."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (step, i) in skip else torch.randn(p.shape, generator=gen)
        opt.step()


def assert_same(params_a, opt_a, params_b, opt_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa.detach(), pb.detach())
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa["step"] == sb["step"]
        for key in ("state1", "state2"):
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("kind", ["AdamW8bit", "PagedAdamW8bit"])
def test_same_numbers_as_stock_bitsandbytes(kind, weight_decay):
    ours_params, stock_params = make_params(), make_params()
    ours = build_optimizer(groups_of(ours_params), kind, lr=1e-3, weight_decay=weight_decay)
    stock = getattr(bnb.optim, kind)(groups_of(stock_params), lr=1e-3, weight_decay=weight_decay)
    assert type(ours) is not type(stock) and isinstance(ours, type(stock))
    skip = {(1, 0), (2, 0), (3, 4)}  # tensors whose step counts drift apart, one of them 32-bit, one 8-bit
    run(ours, ours_params, 6, seed=1, skip=skip)
    run(stock, stock_params, 6, seed=1, skip=skip)
    assert_same(ours_params, ours, stock_params, stock)
    assert ours.state[ours_params[1]]["state1"].dtype == torch.uint8  # the 8-bit ones stay 8-bit


def test_the_small_tensors_are_the_grouped_ones():
    params = make_params()
    opt = build_optimizer(groups_of(params), "AdamW8bit", lr=1e-3)
    calls = []
    original = type(opt)._adam_update
    type(opt)._adam_update = lambda self, group, ps, step: calls.append(len(ps)) or original(self, group, ps, step)
    try:
        run(opt, params, 2, seed=0)
    finally:
        type(opt)._adam_update = original
    assert calls == [2, 1, 2, 1]  # per step: (8, 8) + (3, 7, 1, 1) in group 1, (40,) in group 2


@pytest.mark.parametrize("direction", ["ours-to-stock", "stock-to-ours"])
def test_state_dict_moves_between_ours_and_stock(direction):
    """A training state saved by one loads into the other and training continues identically."""
    first_params, ref_params = make_params(), make_params()
    ours_first = direction == "ours-to-stock"
    build = lambda params, ours: (build_optimizer(groups_of(params), "AdamW8bit", lr=1e-3, weight_decay=0.01) if ours
                                  else bnb.optim.AdamW8bit(groups_of(params), lr=1e-3, weight_decay=0.01))
    first, ref = build(first_params, ours_first), build(ref_params, True)
    run(first, first_params, 3, seed=2)
    run(ref, ref_params, 3, seed=2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    second = build(second_params, not ours_first)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    run(second, second_params, 3, seed=3)
    run(ref, ref_params, 3, seed=3)
    assert_same(second_params, second, ref_params, ref)


def test_lion_and_overrides_stay_with_bitsandbytes():
    assert optimizer_class("Lion8bit") is bnb.optim.Lion8bit
    params, stock_params = make_params(), make_params()
    ours = build_optimizer(groups_of(params), "AdamW8bit", lr=1e-3, weight_decay=0.01)
    stock = bnb.optim.AdamW8bit(groups_of(stock_params), lr=1e-3, weight_decay=0.01)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    try:
        for ps in (params, stock_params):
            manager.override_config(ps[0], "betas", (0.8, 0.9))
        run(ours, params, 3, seed=4)
        run(stock, stock_params, 3, seed=4)
    finally:
        manager.pid2config.clear()
    assert_same(params, ours, stock_params, stock)
    plain = make_params()
    run(build_optimizer(groups_of(plain), "AdamW8bit", lr=1e-3, weight_decay=0.01), plain, 3, seed=4)
    assert not torch.equal(plain[0], params[0])  # the override took effect
    assert copy.deepcopy(ours.state_dict())["state"]
