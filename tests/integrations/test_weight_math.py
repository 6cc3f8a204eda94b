"""The integrations' weight math against the float64 DoRA formula, on real tiny SD1.5/SDXL layers.

W = W0 + k·(W' − W0), W' = m·V/‖V‖ per channel, V = W0 + (alpha/rank)·up·down, computed here in float64 with a
loop over channels, from the trained magnitude m and the file's (fp16) up/down. Checked for the ComfyUI node's
patch (`exact_dora.apply_patch`) and for the A1111 / Forge extension's wrappers, on both axes, strengths 1 and
0.5, a UNet attention Linear, 3×3 and 1×1 convolutions, CLIP-L and CLIP-G projections, and for files written with
the magnitude itself and for ComfyUI's ‖W0‖ rule. On the input axis the extension hands the module to the UI's own
code; a replay of that code stands in for it here (`sdtrain.export.ui_rules`, checked against the real A1111 and
Forge code by test_real_loaders.py).
"""

from __future__ import annotations

import types

import pytest
import torch

from helpers_adapters import randomize
from sdtrain.adapters.dora import DoRAConv2d, DoRALinear
from sdtrain.export import targets, ui_rules
from sdtrain.export.adapter_file import adapter_file_from_tensors, module_tensors
from sdtrain.models.tiny import build_tiny_pipeline

LAYERS = {  # (arch, component, module path)
    "unet-linear": ("sdxl", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    "unet-conv3x3": ("sdxl", "unet", "down_blocks.0.resnets.0.conv1"),
    "unet-conv1x1": ("sd15", "unet", "down_blocks.0.attentions.0.proj_in"),
    "clip-l": ("sdxl", "text_encoder", "encoder.layers.1.self_attn.q_proj"),
    "clip-g": ("sdxl", "text_encoder_2", "text_model.encoder.layers.2.mlp.fc1"),
}
CASES = [("output", targets.MAGNITUDE), ("output", targets.COMFYUI_W0_NORM), ("input", targets.MAGNITUDE)]
TOLERANCE = 2e-6  # fp32 math vs float64


@pytest.fixture(scope="module")
def pipes():
    return {arch: build_tiny_pipeline(arch, seed=0) for arch in ("sd15", "sdxl")}


def dora_case(pipes, layer: str, axis: str, rule: str):
    """(W0 fp32, the file's module tensors, the trained magnitude m) for a random DoRA on a real tiny layer."""
    arch, component, path = LAYERS[layer]
    base = getattr(pipes[arch], component).get_submodule(path)
    cls = DoRAConv2d if isinstance(base, torch.nn.Conv2d) else DoRALinear
    module = cls(base, 4, 3.0, axis=axis)
    torch.manual_seed(hash((layer, axis)) % 1000)
    randomize([module], up_std=0.05, magnitude_spread=0.1)
    tensors = adapter_file_from_tensors(module_tensors("lora_x", module, torch.float16, rule),
                                        {"sdtrain_dora_scale": rule}).modules["lora_x"]
    return base.weight.detach().float().clone(), tensors, module.magnitude.detach().double()


def formula(w0, tensors, magnitude, axis, strength):
    """The DoRA weight in float64 with a loop over channels."""
    w0 = w0.double()
    delta = (tensors.up.double().flatten(1) @ tensors.down.double().flatten(1)).reshape(w0.shape)
    v = w0 + delta * (tensors.alpha / tensors.rank)
    merged = torch.empty_like(v)
    for c in range(magnitude.numel()):
        if axis == "output":
            merged[c] = v[c] * magnitude[c] / v[c].pow(2).sum().sqrt()
        else:
            merged[:, c] = v[:, c] * magnitude[c] / v[:, c].pow(2).sum().sqrt()
    return w0 + strength * (merged - w0)


def rel(a, b) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("axis,rule", CASES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_comfyui_node_patch(pipes, comfyui_package, layer, axis, rule, strength):
    exact_dora = comfyui_package.exact_dora
    w0, tensors, magnitude = dora_case(pipes, layer, axis, rule)
    assert exact_dora.dora_axis(tensors.dora_scale.shape, w0.shape) == axis
    weight = w0.clone()
    out = exact_dora.apply_patch(weight, tensors.up, tensors.down, tensors.alpha, tensors.dora_scale, strength, axis, rule)
    assert out is weight  # in place, as ComfyUI's patches
    assert rel(weight, formula(w0, tensors, magnitude, axis, strength)) <= TOLERANCE
    # a bf16/fp16 model on the low-VRAM path: fp32 math inside, only the stored result is rounded
    half = w0.half()
    patched = exact_dora.apply_patch(half.clone(), tensors.up, tensors.down, tensors.alpha, tensors.dora_scale, strength,
                                     axis, rule)
    assert patched.dtype == torch.float16
    assert rel(patched, formula(half.float(), tensors, magnitude, axis, strength)) <= 1e-3


def a1111_stand_in(self, updown, orig_weight):
    """A1111 1.10's input-axis decomposition (replayed; the extension leaves it to A1111)."""
    return ui_rules._a1111_decompose(orig_weight.to(updown.dtype), updown, self.dora_scale.to(updown.dtype))


def forge_stand_in(dora_scale, weight, lora_diff, alpha, strength, computation_dtype, function):
    """Forge's input-axis branch (ComfyUI's rule, replayed; the extension leaves it to Forge)."""
    merged = weight + function(lora_diff * alpha)
    result = merged * (dora_scale / (ui_rules.input_axis_norm(merged) + ui_rules.FP32_EPS))
    weight += strength * (result - weight)
    return weight


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("axis,rule", CASES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_webui_extension(pipes, webui_extension, layer, axis, rule, strength):
    w0, tensors, magnitude = dora_case(pipes, layer, axis, rule)
    expected = formula(w0, tensors, magnitude, axis, strength)
    updown = (tensors.up.float().flatten(1) @ tensors.down.float().flatten(1)).reshape(w0.shape) * tensors.scale
    # A1111: apply_weight_decompose(self, updown, orig_weight) -> W' - W0; the Lora weight k multiplies it
    calls = []

    def original(self, up_down, weight):
        calls.append("a1111")
        return a1111_stand_in(self, up_down, weight)

    apply = webui_extension.a1111_apply_weight_decompose(original)
    metadata = {"sdtrain_dora_scale": rule} if rule != targets.MAGNITUDE else {}
    network_module = types.SimpleNamespace(dora_scale=tensors.dora_scale, network=types.SimpleNamespace(
        network_on_disk=types.SimpleNamespace(metadata=metadata)))
    for dtype, tolerance in ((torch.float32, TOLERANCE), (torch.float16, 4e-3)):  # A1111 computes in fp16
        result = w0.to(dtype) + apply(network_module, updown.to(dtype), w0.to(dtype)) * strength
        assert rel(result.float(), expected) <= tolerance, dtype
    assert calls == (["a1111"] * 2 if axis == "input" else [])
    # Forge: weight_decompose(dora_scale, weight, lora_diff, alpha, strength, dtype, function) -> W, in place
    forge = webui_extension.forge_weight_decompose(forge_stand_in)
    dora_scale = tensors.dora_scale.clone()
    if rule != targets.MAGNITUDE:
        setattr(dora_scale, webui_extension.TAG, rule)
    lora_diff = (tensors.up.float().flatten(1) @ tensors.down.float().flatten(1)).reshape(w0.shape)
    weight = w0.clone()
    result = forge(dora_scale, weight, lora_diff, tensors.scale, strength, torch.float32, lambda a: a)
    assert rel(result, expected) <= TOLERANCE


def test_webui_reads_the_rule_of_forge_files(tmp_path, pipes, webui_extension):
    """Forge's loader wrapper tags a file's dora_scale tensors with the rule in its metadata."""
    from safetensors.torch import save_file

    w0, tensors, magnitude = dora_case(pipes, "unet-linear", "output", targets.COMFYUI_W0_NORM)
    path = tmp_path / "a.safetensors"
    save_file({"lora_x.dora_scale": tensors.dora_scale}, str(path), {"sdtrain_dora_scale": targets.COMFYUI_W0_NORM})
    seen = {}
    loader = webui_extension.forge_tagging_loader(lambda *args, **kwargs: seen.update(kwargs) or "loaded")
    state = {"lora_x.dora_scale": tensors.dora_scale.clone()}
    assert loader("unet", "clip", state, 1.0, 1.0, filename=str(path), online_mode=False) == "loaded"
    assert getattr(state["lora_x.dora_scale"], webui_extension.TAG) == targets.COMFYUI_W0_NORM
    assert seen == {"filename": str(path), "online_mode": False}


@pytest.mark.parametrize("shape,weight,output", [
    ((40, 1), (40, 24), True), ((1, 24), (40, 24), False), ((24, 1, 1, 1), (24, 16, 3, 3), True),
    ((40,), (40, 24), True), ((24,), (40, 24), False), ((32,), (32, 32), False),  # square 1-D: input convention
])
def test_axis_detection(comfyui_package, webui_extension, shape, weight, output):
    assert webui_extension.is_output_axis(torch.ones(shape), torch.ones(weight)) is output
    assert comfyui_package.exact_dora.dora_axis(shape, weight) == ("output" if output else "input")
    assert comfyui_package.exact_dora.dora_axis((32,), (32, 32), hint="output") == "output"
    with pytest.raises(ValueError):
        comfyui_package.exact_dora.dora_axis((7, 1), (40, 24))
