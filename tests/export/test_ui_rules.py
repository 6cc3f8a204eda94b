"""UI merge-rule replays vs sdtrain's merged weights and vs naive per-channel formulas written here.

The naive references loop over channels in float64 and follow the rules as the loaders' code has them
(alpha/rank before the decomposition, which norm each loader divides by, where strength enters). That the
replays equal the loaders' own code (ComfyUI a125cd84 / v0.3.64, Forge dfdcbab6, A1111 82a973c0 / v1.10.1,
LyCORIS f49d30d6) is checked by tests/integrations/test_real_loaders.py when the checkouts are at hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers_adapters import randomize
from sdtrain.adapters.dora import DoRAConv2d, DoRALinear
from sdtrain.export import ui_rules
from sdtrain.export.adapter_file import adapter_file_from_tensors, module_tensors

EXACT = 1e-6
KINDS = {
    "linear": lambda: nn.Linear(24, 40),
    "conv3x3": lambda: nn.Conv2d(16, 24, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(16, 24, 1),
}
FP32_RULES = {
    "comfyui_fixed": ui_rules.comfyui_fixed,
    "lycoris": ui_rules.lycoris,
    "a1111_110_fp32": lambda *a, **k: ui_rules.a1111_110(*a, compute_dtype=torch.float32, **k),
}
INPUT_AXIS_RULES = {name: rule for name, rule in FP32_RULES.items() if name != "lycoris"}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def trained(kind: str, axis: str, rank: int = 4, alpha: float = 3.0, decompose: bool = True):
    """An sdtrain DoRA module with random, realistic A, B and m (ΔW a few % of W0)."""
    base = KINDS[kind]()
    cls = DoRALinear if isinstance(base, nn.Linear) else DoRAConv2d
    module = cls(base, rank, alpha, decompose=decompose, axis=axis)
    randomize([module], up_std=0.02, magnitude_spread=0.05)
    return module


def as_file(module, dtype=torch.float32):
    """The module as an adapter file would hold it (sdtrain's writer, then the reader)."""
    return adapter_file_from_tensors(module_tensors("lora_unet_x", module, dtype)).modules["lora_unet_x"]


def naive_merge(w0, down, up, alpha, magnitude, axis, norm_of="merged", strength=1.0):
    """W0 + k·(W' − W0) with W' = m·V/‖·‖ per channel, V = W0 + (alpha/rank)·up·down, float64, channel loop."""
    w0 = w0.double()
    rank = down.shape[0]
    delta = (up.double().reshape(up.shape[0], rank) @ down.double().reshape(rank, -1)).reshape(w0.shape)
    v = w0 + (alpha / rank) * delta
    normed = v if norm_of == "merged" else w0
    out = torch.empty_like(v)
    m = magnitude.double().flatten()
    for c in range(m.numel()):
        if axis == "output":
            out[c] = v[c] * m[c] / normed[c].pow(2).sum().sqrt()
        else:
            out[:, c] = v[:, c] * m[c] / normed[:, c].pow(2).sum().sqrt()
    return w0 + strength * (out - w0)


def apply(rule, module, tensors, strength=1.0):
    w0 = module.original_weight()
    return rule(w0, tensors.down, tensors.up, tensors.alpha, tensors.dora_scale, strength)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(INPUT_AXIS_RULES) + ["comfyui_current"])
def test_input_axis_rebuilds_are_exact(kind, name):
    module = trained(kind, "input")
    tensors = as_file(module)
    rule = INPUT_AXIS_RULES.get(name, ui_rules.comfyui_current)
    ours = module.merged_weight()
    assert rel(apply(rule, module, tensors), ours) <= EXACT
    reference = naive_merge(module.original_weight(), module.lora_down.weight, module.lora_up.weight,
                            module.alpha, module.magnitude, "input")
    assert rel(ours, reference) <= EXACT


@pytest.mark.parametrize("kind", list(KINDS))
def test_a1111_fp16_compute_is_rounding_only(kind):
    module = trained(kind, "input")
    error = rel(apply(ui_rules.a1111_110, module, as_file(module)), module.merged_weight())
    print(f"A1111 1.10 fp16 rebuild, {kind}: max rel error {error:.2e}")
    assert 0 < error <= 4e-3


@pytest.mark.parametrize("kind", list(KINDS))
def test_output_axis(kind):
    module = trained(kind, "output")
    tensors = as_file(module)
    ours = module.merged_weight()
    for name in ("comfyui_fixed", "lycoris"):
        assert rel(apply(FP32_RULES[name], module, tensors), ours) <= EXACT, name
    current = apply(ui_rules.comfyui_current, module, tensors)
    error = rel(current, ours)
    print(f"current ComfyUI, output axis, {kind}: max rel error {error:.2e}")
    assert error > 1e-4  # measurably wrong ...
    wrong_norm = naive_merge(module.original_weight(), module.lora_down.weight, module.lora_up.weight,
                             module.alpha, module.magnitude, "output", norm_of="base")
    assert rel(current, wrong_norm) <= EXACT  # ... in exactly the documented way (norm of W0)
    a1111 = apply(lambda *a: ui_rules.a1111_110(*a, compute_dtype=torch.float32), module, tensors)
    assert rel(a1111, ours) > 0.05  # [out, 1] / [1, in] broadcasts into garbage


@pytest.mark.parametrize("axis", ["input", "output"])
def test_strength(axis):
    module = trained("conv3x3", axis)
    tensors = as_file(module)
    ours = module.merged_weight(0.6)
    assert rel(apply(ui_rules.comfyui_fixed, module, tensors, 0.6), ours) <= EXACT
    if axis == "input":
        a1111 = apply(lambda *a: ui_rules.a1111_110(*a, compute_dtype=torch.float32), module, tensors, 0.6)
        assert rel(a1111, ours) <= EXACT
    if axis == "input":
        with pytest.raises(RuntimeError):  # LyCORIS builds an output-axis module: [1, in] does not fit [out, 1]
            apply(ui_rules.lycoris, module, tensors, 0.6)
        return
    # LyCORIS scales the magnitude ratio instead: V·(k·(m/‖V‖ − 1) + 1)
    w0 = module.original_weight().double()
    v = w0 + module.delta_weight().double()
    full = naive_merge(module.original_weight(), module.lora_down.weight, module.lora_up.weight,
                       module.alpha, module.magnitude, axis)
    ratio = torch.where(v.abs() > 0, full / v, torch.ones_like(v))
    expected = v * (0.6 * (ratio - 1) + 1)
    lycoris = apply(ui_rules.lycoris, module, tensors, 0.6)
    assert rel(lycoris, expected) <= EXACT
    assert rel(lycoris, ours) > 1e-4


def test_alpha_folding_makes_a1111_19_exact():
    module = trained("linear", "input", rank=4, alpha=3.0)
    folded = as_file(module)
    assert folded.alpha == 4.0
    fp32_19 = lambda *a, **k: ui_rules.a1111_19(*a, compute_dtype=torch.float32, **k)  # noqa: E731
    assert rel(apply(fp32_19, module, folded), module.merged_weight()) <= EXACT
    # the same adapter stored the naive way (alpha = 3, lora_up unscaled) is wrong in A1111 1.9 only
    w0 = module.original_weight()
    down, up = module.lora_down.weight.detach(), module.lora_up.weight.detach()
    magnitude = module.magnitude.detach().reshape(1, -1)
    assert rel(ui_rules.a1111_110(w0, down, up, 3.0, magnitude, compute_dtype=torch.float32),
               module.merged_weight()) <= EXACT
    assert rel(ui_rules.a1111_19(w0, down, up, 3.0, magnitude, compute_dtype=torch.float32),
               module.merged_weight()) > 1e-3


def test_one_dimensional_dora_scale_misleads_comfyui():
    base = nn.Linear(32, 32)  # square: a 1-D input-axis magnitude looks like an output-axis one
    module = DoRALinear(base, 4, 4.0, axis="input")
    randomize([module], up_std=0.02, magnitude_spread=0.05)
    w0, down, up = base.weight, module.lora_down.weight.detach(), module.lora_up.weight.detach()
    ours = module.merged_weight()
    two_d = ui_rules.comfyui_current(w0, down, up, 4.0, module.magnitude.detach().reshape(1, -1))
    one_d = ui_rules.comfyui_current(w0, down, up, 4.0, module.magnitude.detach())
    assert rel(two_d, ours) <= EXACT
    assert rel(one_d, ours) > 1e-3


def test_plain_lora_and_diffusers_rule():
    module = trained("conv3x3", "output", decompose=False)
    tensors = as_file(module)
    assert tensors.dora_scale is None
    ours = module.merged_weight(0.7)
    w0 = module.original_weight().double()
    delta = module.alpha / module.rank * (
        module.lora_up.weight.double().flatten(1) @ module.lora_down.weight.double().flatten(1)).reshape(w0.shape)
    assert rel(ours, w0 + 0.7 * delta) <= EXACT
    for rule in (ui_rules.comfyui_current, ui_rules.lycoris, ui_rules.diffusers_plain):
        assert rel(apply(rule, module, tensors, 0.7), ours) <= EXACT
    # diffusers ignores a dora_scale entirely
    dora = trained("linear", "input")
    dora_tensors = as_file(dora)
    plain = apply(ui_rules.diffusers_plain, dora, dora_tensors)
    assert rel(plain, dora.original_weight() + dora.delta_weight()) <= EXACT


@pytest.mark.parametrize("kind", list(KINDS))
def test_lycoris_refuses_input_axis_files(kind):
    """The package copies dora_scale into an [out, 1, ...] parameter: an input-axis one raises, as does a 1-D one."""
    module = trained(kind, "input")
    tensors = as_file(module)
    with pytest.raises(RuntimeError):
        apply(ui_rules.lycoris, module, tensors)
    output = trained(kind, "output")
    flat = as_file(output).dora_scale.flatten()
    with pytest.raises(RuntimeError):
        ui_rules.lycoris(output.original_weight(), output.lora_down.weight, output.lora_up.weight, output.alpha, flat)
