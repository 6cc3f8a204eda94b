import math
import sys
import types

import pytest
import torch

from sdtrain.errors import ConfigError, UserError
from sdtrain.train.optim import build_lr_scheduler, build_optimizer


def _param(n=8, seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, n))
    p.grad = torch.randn(n, n)
    return p


@pytest.mark.parametrize("type", ["AdamW", "SGD", "Adafactor", "AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
def test_each_optimizer_steps_and_changes_the_param(type):
    p = _param()
    before = p.detach().clone()
    opt = build_optimizer([{"params": [p], "lr": 1e-2, "name": "unet"}], type, lr=1e-2, weight_decay=0.0)
    opt.step()
    assert not torch.equal(p.detach(), before)
    assert torch.isfinite(p).all()
    assert opt.param_groups[0]["name"] == "unet"


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("type,states", [("AdamW8bit", ("state1", "state2")), ("PagedAdamW8bit", ("state1", "state2")),
                                         ("Lion8bit", ("state1",))])
def test_bitsandbytes_8bit_state_on_cpu(type, states):
    big = _param(64)  # 4096 elements: bitsandbytes' min_8bit_size
    small = _param(8)  # 64 elements: kept in 32-bit state by bitsandbytes' default
    opt = build_optimizer([{"params": [big, small], "lr": 1e-3, "name": "g"}], type, lr=1e-3)
    opt.step()
    for key in states:
        assert opt.state[big][key].dtype == torch.uint8
        assert opt.state[small][key].dtype == torch.float32


def test_adamw_group_lrs_follow_the_first_step_formula():
    # First AdamW step: p ← p(1 − lr·wd) − lr · g / (|g| + eps)   (bias-corrected m̂ = g, v̂ = g²)
    a, b = _param(seed=1), _param(seed=2)
    a0, b0, ga, gb = a.detach().clone(), b.detach().clone(), a.grad.clone(), b.grad.clone()
    opt = build_optimizer([{"params": [a], "lr": 1e-2, "name": "unet"}, {"params": [b], "lr": 1e-3, "name": "te"}],
                          "AdamW", lr=5e-2, weight_decay=0.1, eps=1e-8)
    opt.step()
    for p, p0, g, lr in ((a, a0, ga, 1e-2), (b, b0, gb, 1e-3)):
        expected = p0 * (1 - lr * 0.1) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


def test_lion8bit_group_lrs_honoured():
    # First Lion step from zero momentum: p ← p − lr · sign(g)
    a, b = _param(64, seed=3), _param(64, seed=4)
    a0, b0, ga, gb = a.detach().clone(), b.detach().clone(), a.grad.clone(), b.grad.clone()
    opt = build_optimizer([{"params": [a], "lr": 1e-2, "name": "unet"}, {"params": [b], "lr": 1e-3, "name": "te"}],
                          "Lion8bit", lr=1.0, weight_decay=0.0)
    opt.step()
    torch.testing.assert_close(a.detach(), a0 - 1e-2 * ga.sign(), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), b0 - 1e-3 * gb.sign(), rtol=0, atol=1e-6)


def test_sgd_group_lrs_and_args():
    a, b = _param(seed=5), _param(seed=6)
    a0, b0, ga, gb = a.detach().clone(), b.detach().clone(), a.grad.clone(), b.grad.clone()
    opt = build_optimizer([{"params": [a], "lr": 0.5, "name": "x"}, {"params": [b], "lr": 0.25, "name": "y"}],
                          "SGD", lr=1.0, args={"momentum": 0.9})
    assert opt.defaults["momentum"] == 0.9
    opt.step()  # first momentum step equals plain SGD
    torch.testing.assert_close(a.detach(), a0 - 0.5 * ga)
    torch.testing.assert_close(b.detach(), b0 - 0.25 * gb)


def test_betas_eps_and_args_reach_the_optimizer():
    opt = build_optimizer([{"params": [_param()], "lr": 1e-4, "name": "g"}], "AdamW", lr=1e-4, weight_decay=0.02,
                          betas=[0.8, 0.95], eps=1e-6, args={"amsgrad": True})
    assert opt.defaults["betas"] == (0.8, 0.95)
    assert opt.defaults["eps"] == 1e-6
    assert opt.defaults["weight_decay"] == 0.02
    assert opt.defaults["amsgrad"] is True


def test_adafactor_uses_the_given_lr():
    opt = build_optimizer([{"params": [_param()], "lr": 1e-3, "name": "g"}], "Adafactor", lr=1e-3)
    d = opt.defaults
    assert (d["lr"], d["relative_step"], d["scale_parameter"], d["warmup_init"]) == (1e-3, False, False, False)


def test_unknown_arg_names_its_config_key():
    with pytest.raises(ConfigError, match=r"optimizer\.args\.decouple") as info:
        build_optimizer([{"params": [_param()], "lr": 1e-4, "name": "g"}], "AdamW8bit", lr=1e-4, args={"decouple": True})
    assert "min_8bit_size" in str(info.value)  # lists what is accepted


def test_settings_that_do_not_apply_are_config_errors():
    groups = [{"params": [_param()], "lr": 1e-4, "name": "g"}]
    with pytest.raises(ConfigError, match=r"optimizer\.eps"):
        build_optimizer(groups, "Lion8bit", lr=1e-4, eps=1e-8)
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        build_optimizer(groups, "AdamW", lr=1e-4, args={"lr": 1e-3})


def test_prodigy_missing_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as when not installed
    with pytest.raises(UserError, match="pip install prodigyopt"):
        build_optimizer([{"params": [_param()], "lr": 1.0, "name": "g"}], "Prodigy", lr=1.0)


def test_prodigy_used_when_installed(monkeypatch):
    class FakeProdigy(torch.optim.SGD):
        def __init__(self, params, lr=1.0, weight_decay=0.0, d_coef=1.0):
            super().__init__(params, lr=lr, weight_decay=weight_decay)
            self.d_coef = d_coef

    monkeypatch.setitem(sys.modules, "prodigyopt", types.SimpleNamespace(Prodigy=FakeProdigy))
    opt = build_optimizer([{"params": [_param()], "lr": 1.0, "name": "g"}], "Prodigy", lr=1.0, args={"d_coef": 2.0})
    assert isinstance(opt, FakeProdigy) and opt.d_coef == 2.0


# ---- learning-rate schedules: multiplier of each group's lr after `s` scheduler steps -----------------------
W, T = 10, 110


def _expected(type, s, cycles=1, power=1.0, lr0=1.0):
    if type == "constant":
        return 1.0
    if s < W:
        return s / W
    if type == "constant_with_warmup":
        return 1.0
    p = (s - W) / (T - W)
    if type == "linear":
        return max(0.0, 1 - p)
    if type == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if type == "cosine_with_restarts":
        return 0.0 if p >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1)))
    if type == "polynomial":
        end = 1e-7
        return ((lr0 - end) * (1 - p) ** power + end) / lr0


@pytest.mark.parametrize("type,kw", [("constant", {}), ("constant_with_warmup", {}), ("linear", {}), ("cosine", {}),
                                     ("cosine_with_restarts", {"num_cycles": 3}), ("polynomial", {"power": 2.0})])
def test_schedule_matches_formula(type, kw):
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.25}], lr=1.0)
    sched = build_lr_scheduler(opt, type, warmup_steps=0 if type == "constant" else W, total_steps=T, **kw)
    checks = {0, 5, 10, 35, 60, 85, 109, 110}
    for s in range(T + 1):
        if s in checks:
            m = _expected(type, s, cycles=kw.get("num_cycles", 1), power=kw.get("power", 1.0))
            assert sched.get_last_lr() == pytest.approx([m, 0.25 * m], abs=1e-9), (type, s)
        opt.step()
        sched.step()


def test_schedule_hand_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_lr_scheduler(opt, "cosine", warmup_steps=10, total_steps=110)
    lrs = []
    for _ in range(111):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[5] == pytest.approx(1.0)  # half-way through warm-up
    assert lrs[35] == pytest.approx(2.0 * 0.8535534, abs=1e-6)  # a quarter into the decay: (1 + cos 45°) / 2
    assert lrs[60] == pytest.approx(1.0)  # half-way
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)


def test_warmup_with_constant_is_a_config_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        build_lr_scheduler(opt, "constant", warmup_steps=5, total_steps=10)


@pytest.mark.parametrize("type", ["AdamW", "AdamW8bit", "Lion8bit", "Adafactor", "SGD"])
def test_step_marks_updated_parameters_for_the_dora_norm_cache(type):
    """bitsandbytes writes parameters without bumping their version counters; the optimizer's post-step hook
    does, so a DoRA layer recomputes 1/‖V‖ after every step (its cache is keyed on the counters) and its output
    equals the dense reference with the updated weights."""
    from sdtrain.adapters.dora import DoRALinear

    torch.manual_seed(0)
    module = DoRALinear(torch.nn.Linear(96, 80), rank=48, alpha=48.0)  # A and B ≥ 4096 elements: 8-bit state
    with torch.no_grad():
        module.lora_up.weight.normal_(0, 0.1)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params, "lr": 0.05, "name": "all"}], type, 0.05)
    x = torch.randn(8, 96)
    for _ in range(3):
        module(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, module.merged_weight(), module.base.bias)
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
