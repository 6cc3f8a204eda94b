"""DoRA/LoRA layers against independent references: a naive dense formula (float64) and PEFT's DoRA."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdtrain.adapters import dora
from sdtrain.adapters.dora import DoRAConv2d, DoRALinear, weight_norm
from sdtrain.errors import ConfigError

TOL = 1e-5

# name -> (factory of the base layer, input shape)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (2, 5, 12)),
    "conv3x3_s2_p1": (lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1), (2, 5, 9, 8)),
    "conv3x3_dil2": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), (1, 4, 7, 7)),
    "conv1x1": (lambda: nn.Conv2d(6, 5, 1), (2, 6, 4, 5)),
    "linear_nobias": (lambda: nn.Linear(9, 8, bias=False), (6, 9)),
    "conv_nobias": (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (1, 3, 5, 5)),
}


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make(name, seed=0, **kwargs):
    """A wrapped layer with random (non-initial) A, B, m and its input."""
    torch.manual_seed(seed)
    factory, shape = LAYERS[name]
    base = factory()
    cls = DoRALinear if isinstance(base, nn.Linear) else DoRAConv2d
    module = cls(base, rank=3, alpha=5.0, **kwargs)
    with torch.no_grad():
        module.lora_up.weight.normal_(0, 0.3)
        if module.magnitude is not None:
            module.magnitude.mul_(1 + 0.3 * torch.rand_like(module.magnitude))
    x = torch.randn(shape)
    return module, x


def naive(module, x, strength=1.0, detach=None, w0=None):
    """The layer with the dense weight W0 + k·(m·V/‖V‖ − W0), V = W0 + s·B·A, all in float64 (W0 given: with its
    gradient)."""
    detach = module.detach_norm if detach is None else detach
    w0 = (module.base.weight.detach() if w0 is None else w0).double()
    a = module.lora_down.weight.double()
    b = module.lora_up.weight.double()
    v = w0 + module.scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w0.shape)
    if module.magnitude is None:
        w = v
    else:
        if module.axis == "output":
            norm = torch.sqrt((v ** 2).reshape(v.shape[0], -1).sum(1) + dora.NORM_EPS).reshape((-1,) + (1,) * (v.dim() - 1))
            m = module.magnitude.double().reshape(norm.shape)
        else:
            norm = torch.sqrt((v ** 2).transpose(0, 1).reshape(v.shape[1], -1).sum(1) + dora.NORM_EPS).reshape(
                (1, -1) + (1,) * (v.dim() - 2))
            m = module.magnitude.double().reshape(norm.shape)
        if detach:
            norm = norm.detach()
        w = m * v / norm
    w = w0 + strength * (w - w0)
    bias = None if module.base.bias is None else module.base.bias.detach().double()
    if isinstance(module.base, nn.Linear):
        return F.linear(x.double(), w, bias)
    base = module.base
    return F.conv2d(x.double(), w, bias, base.stride, base.padding, base.dilation)


def params(module):
    ps = [module.lora_down.weight, module.lora_up.weight]
    return ps + ([module.magnitude] if module.magnitude is not None else [])


def outputs_and_grads(fn, module, x, grad_out=None):
    """fn(x) and the gradients of x, A, B (and m) for a fixed random output gradient (zeros if unused)."""
    x = x.detach().clone().requires_grad_(True)
    for p in params(module):
        p.grad = None
    y = fn(x)
    if grad_out is None:
        torch.manual_seed(123)
        grad_out = torch.randn(y.shape)
    y.backward(grad_out.to(y.dtype))
    grads = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in [x] + params(module)]
    for p in params(module):
        p.grad = None
    return y.detach(), grads


def check_against_naive(module, x, strength=1.0):
    y, grads = outputs_and_grads(module, module, x)
    y_ref, grads_ref = outputs_and_grads(lambda inp: naive(module, inp, strength), module, x)
    assert rel_err(y, y_ref) <= TOL
    for name, g, g_ref in zip(["x", "A", "B", "m"], grads, grads_ref):
        assert rel_err(g, g_ref) <= TOL, name


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_dora_matches_naive_dense_formula(name, axis, detach_norm):
    module, x = make(name, axis=axis, detach_norm=detach_norm)
    check_against_naive(module, x)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_trainable_base_uses_the_dense_reference_and_matches_naive(axis):
    """A base weight that requires grad takes the dense reference path; W0 gets its gradient too."""
    module, x = make("conv3x3_s2_p1", axis=axis, detach_norm=False)
    module.base.weight.requires_grad_(True)
    check_against_naive(module, x)
    grads = []
    for fn in (module, lambda inp: naive(module, inp, w0=module.base.weight)):
        module.base.weight.grad = None
        fn(x).square().sum().backward()
        grads.append(module.base.weight.grad.clone())
    assert rel_err(grads[0], grads[1]) <= TOL


@pytest.mark.parametrize("name", list(LAYERS))
def test_lora_matches_naive(name):
    module, x = make(name, decompose=False)
    assert module.magnitude is None
    check_against_naive(module, x)
    module.multiplier = 0.4
    check_against_naive(module, x, strength=0.4)


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.7])
@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("name", ["linear", "conv3x3_s2_p1"])
def test_strength_matches_naive_blend(name, axis, strength):
    module, x = make(name, axis=axis)
    module.multiplier = strength
    check_against_naive(module, x, strength)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_channels_last_conv_input(axis):
    module, x = make("conv3x3_s2_p1", axis=axis)
    check_against_naive(module, x.to(memory_format=torch.channels_last))


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("name", ["linear", "conv3x3_s2_p1"])
def test_expanded_output_gradient(name, axis):
    """y.sum().backward() hands the layer a stride-0 gradient."""
    module, x = make(name, axis=axis)
    grads = []
    for fn in (module, lambda inp: naive(module, inp)):
        inp = x.clone().requires_grad_(True)
        fn(inp).sum().backward()
        grads.append([inp.grad] + [p.grad.clone() for p in params(module)])
        for p in params(module):
            p.grad = None
    for g, g_ref in zip(*grads):
        assert rel_err(g, g_ref) <= TOL


@pytest.mark.parametrize("name", ["linear", "conv3x3_s2_p1"])
def test_small_magnitude_channels(name):
    """The output axis recovers the pre-scale activations from its output, z = (y − bias) / c: exact for c = 0 on a
    zero row of V (W0's row and B's row zero, the one way c = 0 arises in training), and for small c without a
    bias."""
    module, x = make(name)
    with torch.no_grad():
        module.base.weight[0] = 0.0
        module.lora_up.weight[0] = 0.0
        module.magnitude[0] = 0.0
    check_against_naive(module, x)
    module.base.bias = None
    with torch.no_grad():
        module.magnitude[1] = 1e-6
        module.magnitude[2] = 1e-3
    check_against_naive(module, x)


@pytest.mark.parametrize("name", ["linear", "conv3x3_s2_p1"])
def test_small_magnitude_under_a_large_bias_keeps_the_documented_precision(name):
    """With a bias, grad m of a channel has the rounding of y − bias: |error| ≲ ε·Σ|g ⊙ y| / |c| · (1/‖V‖); a channel
    with c = 0 exactly gets grad m = 0 (its activations are not in y); every other value is exact and finite."""
    module, x = make(name)
    with torch.no_grad():
        module.magnitude[0] = 0.0
        module.magnitude[1] = 1e-6
        module.base.bias.mul_(20.0)
    y, grads = outputs_and_grads(module, module, x)
    y_ref, grads_ref = outputs_and_grads(lambda inp: naive(module, inp), module, x)
    assert rel_err(y, y_ref) <= TOL
    for name_, g, g_ref in zip(["x", "A", "B"], grads, grads_ref):
        assert rel_err(g, g_ref) <= TOL, name_
    grad_m, grad_m_ref = grads[3].double(), grads_ref[3]
    assert torch.isfinite(grad_m).all() and grad_m[0] == 0.0
    assert rel_err(grad_m[2:], grad_m_ref[2:]) <= TOL
    inv = module.inverse_norm().double()
    c = module.magnitude.detach().double() * inv
    torch.manual_seed(123)
    g = torch.randn(y.shape).double()
    dims = (0, 1) if name == "linear" else (0, 2, 3)
    bound = 4 * torch.finfo(torch.float32).eps * (g * y.double()).abs().sum(dims) / c.abs() * inv
    assert (grad_m[1] - grad_m_ref[1]).abs() <= bound[1]


def test_matches_peft_dora():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 10)
            self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    torch.manual_seed(0)
    net = Net()
    ours = {"lin": DoRALinear(copy.deepcopy(net.lin), 4, 8.0), "conv": DoRAConv2d(copy.deepcopy(net.conv), 4, 8.0)}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "conv"], use_dora=True, lora_dropout=0.0)
    theirs = peft.get_peft_model(net, config).base_model.model
    inputs = {"lin": torch.randn(3, 12), "conv": torch.randn(2, 4, 7, 7)}
    for name, module in ours.items():
        layer = getattr(theirs, name)
        peft_params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                       layer.lora_magnitude_vector["default"].weight]
        with torch.no_grad():
            peft_params[1].normal_(0, 0.3)
            peft_params[2].mul_(1.2)
            module.lora_down.weight.copy_(peft_params[0])
            module.lora_up.weight.copy_(peft_params[1])
            module.magnitude.copy_(peft_params[2].flatten())
        x = inputs[name]
        y, grads = outputs_and_grads(module, module, x)
        x_ref = x.clone().requires_grad_(True)
        y_ref = layer(x_ref)
        torch.manual_seed(123)
        grads_ref = torch.autograd.grad(y_ref, [x_ref] + peft_params, torch.randn(y_ref.shape))
        assert rel_err(y, y_ref) <= TOL
        for label, g, g_ref in zip(["x", "A", "B", "m"], grads, grads_ref):
            assert rel_err(g, g_ref.reshape(g.shape)) <= TOL, (name, label)


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_initial_adapter_equals_base(name, axis):
    torch.manual_seed(0)
    factory, shape = LAYERS[name]
    base = factory()
    module = (DoRALinear if isinstance(base, nn.Linear) else DoRAConv2d)(base, 4, 4.0, axis=axis)
    assert module.base is base and not any(p.requires_grad for p in base.parameters())
    assert torch.equal(module.lora_up.weight, torch.zeros_like(module.lora_up.weight))
    x = torch.randn(shape)
    assert rel_err(module(x), base(x)) <= 1e-6
    assert module.magnitude.dtype == torch.float32
    assert module.magnitude.shape == (base.weight.shape[0] if axis == "output" else base.weight.shape[1],)


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("name", ["linear", "conv3x3_s2_p1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_unmerge(name, axis, dtype):
    module, x = make(name, axis=axis)
    module.base.to(dtype)
    w0 = module.base.weight.detach().clone()
    expected = naive(module, x, strength=0.7)
    module.merge(0.7)
    assert module.merged
    merged = module.base.weight.detach().double()
    w0d = w0.double()
    v = w0d + module.delta_weight().double()
    dim = (1, 2, 3)[: v.dim() - 1] if axis == "output" else (0,) + (2, 3)[: v.dim() - 2]
    norm = torch.linalg.vector_norm(v, dim=dim, keepdim=True)
    dense = module.magnitude.double().view(dora._channel_shape(axis, v.dim())) * v / norm
    assert rel_err(merged, w0d + 0.7 * (dense - w0d)) <= (1e-6 if dtype == torch.float32 else 1e-3)
    if dtype == torch.float32:
        assert rel_err(module(x), expected) <= TOL  # the merged layer gives the adapter's output
    module.unmerge()
    assert not module.merged
    assert (module.base.weight - w0).abs().max().item() <= 1e-6


def test_strength_output_equals_merged_layer():
    module, x = make("conv3x3_s2_p1")
    module.multiplier = 0.3
    y = module(x)
    module.merge(0.3)
    assert rel_err(module(x), y) <= TOL


def test_reset_magnitude_and_weight_norm():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 2, 2)
    out = torch.tensor([sum(w[o, i, p, q] ** 2 for i in range(3) for p in range(2) for q in range(2)) ** 0.5
                        for o in range(5)])
    inp = torch.tensor([sum(w[o, i, p, q] ** 2 for o in range(5) for p in range(2) for q in range(2)) ** 0.5
                        for i in range(3)])
    assert rel_err(weight_norm(w, "output"), out) <= 1e-6
    assert rel_err(weight_norm(w, "input"), inp) <= 1e-6
    lin = torch.randn(4, 6)
    assert rel_err(weight_norm(lin, "input"), lin.norm(dim=0)) <= 1e-6
    module, _ = make("conv3x3_s2_p1", axis="input")
    module.reset_magnitude()
    assert rel_err(module.magnitude, torch.linalg.vector_norm(module.base.weight, dim=(0, 2, 3))) <= 1e-6


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("name", ["linear", "conv3x3_s2_p1"])
def test_bf16_autocast_with_fp16_base(name, axis):
    module, x = make(name, axis=axis)
    reference = copy.deepcopy(module)
    module.base.half()
    with torch.no_grad():
        reference.base.weight.copy_(module.base.weight.float())  # same rounded W0
        reference.base.bias.copy_(module.base.bias.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = outputs_and_grads(module, module, x)
    y_ref, grads_ref = outputs_and_grads(lambda inp: naive(reference, inp), reference, x)
    assert y.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in params(module))
    for t, t_ref in zip([y, *grads], [y_ref, *grads_ref]):
        assert torch.isfinite(t).all()
        assert rel_err(t, t_ref) <= 3e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("name", ["linear", "conv3x3_s2_p1"])
def test_norm_is_fp32_under_low_precision_autocast(name, axis, detach_norm, dtype, monkeypatch):
    """Under bf16 (fp16) autocast over a bf16 (fp16) base the channel norm is computed in fp32 (as precise as
    from the fp32 weights), and the fp32 channel scale reaches the output: a magnitude change no larger than the dtype's
    relative rounding error (bf16 2⁻⁸, fp16 2⁻¹¹; the change is 2⁻¹⁰ and 2⁻¹¹) still changes the output."""
    module, x = make(name, axis=axis, detach_norm=detach_norm)
    x = torch.randn(64, 12) if name == "linear" else torch.randn(8, 5, 9, 8)
    change = 2 ** -10 if dtype == torch.bfloat16 else 2 ** -11
    module.base.to(dtype)
    w0 = module.base.weight.detach().double()
    v = w0 + module.delta_weight().double()
    dims = tuple(d for d in range(v.dim()) if d != (0 if axis == "output" else 1))
    expected = 1 / torch.linalg.vector_norm(v, dim=dims)
    norms = []
    original = dora.DoRAModule.norm_squared
    monkeypatch.setattr(dora.DoRAModule, "norm_squared", lambda self: norms.append(original(self)) or norms[-1])
    with torch.autocast("cpu", dtype=dtype):
        y = module(x)
        with torch.no_grad():
            module.magnitude.mul_(1 + change)
        y2 = module(x)
    assert y.dtype == dtype and norms and all(n.dtype == torch.float32 for n in norms)
    assert rel_err(norms[-1].rsqrt(), expected) <= 1e-6
    bias = module.base.bias.double().view(dora._channel_shape("input", y.dim()) if name != "linear" else -1)
    z = y.detach().double() - bias  # y − bias is linear in c: a uniform change of m scales it by 1 + change
    fitted = ((y2.detach().double() - y.detach().double()) * z).sum() / z.square().sum()
    assert abs(fitted - change) < change / 4


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("axis", ["output", "input"])
def test_gradient_checkpointing_gives_same_grads(axis, detach_norm):
    module, x = make("conv3x3_s2_p1", axis=axis, detach_norm=detach_norm)
    _, grads = outputs_and_grads(module, module, x)
    for reentrant in (False, True):
        _, grads_ckpt = outputs_and_grads(lambda inp: checkpoint(module, inp, use_reentrant=reentrant), module, x)
        for g, g_ckpt in zip(grads, grads_ckpt):
            assert rel_err(g_ckpt, g) <= 1e-6


def test_inference_mode_forward_then_training():
    module, x = make("linear")
    with torch.inference_mode():
        y = module(x)
    assert rel_err(y, naive(module, x)) <= TOL
    check_against_naive(module, x)


def test_base_weight_change_refreshes_cached_norm():
    module, x = make("linear")
    module(x)  # fills the ‖W0‖² cache
    state = module.state_dict()
    state["base.weight"] = torch.randn_like(state["base.weight"])
    module.load_state_dict(state)
    check_against_naive(module, x)


def test_attributes_and_errors():
    module, _ = make("linear", axis="input", detach_norm=False)
    assert (module.rank, module.alpha, module.scale, module.axis) == (3, 5.0, 5.0 / 3, "input")
    assert module.decompose and not module.detach_norm and module.multiplier == 1.0 and not module.merged
    assert set(dict(module.named_parameters())) == {"base.weight", "base.bias", "lora_down.weight",
                                                     "lora_up.weight", "magnitude"}
    conv, _ = make("conv3x3_s2_p1")
    assert isinstance(conv.lora_down, nn.Conv2d) and conv.lora_down.stride == (2, 2)
    assert conv.lora_up.kernel_size == (1, 1) and conv.lora_up.bias is None and conv.lora_down.bias is None
    with pytest.raises(ConfigError, match="groups=1"):
        DoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 2.0)
    with pytest.raises(ConfigError, match="axis"):
        DoRALinear(nn.Linear(3, 3), 2, 2.0, axis="rows")


def count_norm_computations(monkeypatch):
    """A list that grows by one each time a DoRA layer computes its channel norm."""
    calls = []
    original = dora.DoRAModule.norm_squared
    monkeypatch.setattr(dora.DoRAModule, "norm_squared", lambda self: calls.append(1) or original(self))
    return calls


@pytest.mark.parametrize("axis", ["output", "input"])
def test_inverse_norm_is_computed_once_per_weight_update(axis, monkeypatch):
    """Repeated forwards (accumulation, sampling) and checkpoint recomputation reuse 1/‖V‖; every way of
    changing A, B or W0 recomputes it, and the result always matches the dense formula."""
    module, x = make("conv3x3_s2_p1", axis=axis)
    calls = count_norm_computations(monkeypatch)
    module(x), module(x)
    with torch.no_grad():
        module(x)
    assert len(calls) == 1
    outputs_and_grads(lambda inp: checkpoint(module, inp, use_reentrant=False), module, x)
    assert len(calls) == 1  # the checkpoint's recomputing forward reused it
    updates = {
        "optimizer step on A": lambda: module.lora_down.weight.add_(0.1),
        "optimizer step on B": lambda: torch._foreach_mul_([module.lora_up.weight], 1.5),
        "base weight reload": lambda: module.base.load_state_dict(
            {"weight": torch.randn_like(module.base.weight), "bias": module.base.bias.detach()}),
        "alpha change": lambda: setattr(module, "alpha", 2.0),
        "parameter replaced": lambda: setattr(module.lora_up, "weight", nn.Parameter(module.lora_up.weight * 0.5)),
    }
    for what, update in updates.items():
        with torch.no_grad():
            update()
        before = len(calls)
        check_against_naive(module, x)
        assert len(calls) == before + 1, what
    module.lora_down.weight.data.mul_(0.5)  # untracked write: refresh_norms() is the documented way
    module.refresh_norms()
    check_against_naive(module, x)


def test_inverse_norm_cache_is_not_shared_by_copies():
    module, x = make("linear")
    module(x)
    assert module._inverse_norm_cache is not None
    clone = copy.deepcopy(module)
    assert clone._inverse_norm_cache is None
    with torch.no_grad():
        clone.lora_up.weight.mul_(2)
    check_against_naive(clone, x)
    check_against_naive(module, x)
