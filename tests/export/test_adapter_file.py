"""The adapter file: layout, exact round trips on the tiny SD1.5 / SDXL models, foreign files, errors.

References are independent of the code under test: the trained model itself (outputs and parameters),
tensors rounded here by hand, and a naive per-channel DoRA formula.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers_adapters import CONVS, encoders, module_kinds as kinds, outputs, randomize
from sdtrain.adapters.inject import NetworkSpec, inject_adapters
from sdtrain.errors import ModelLoadError
from sdtrain.export.adapter_file import (
    adapter_file_from_tensors,
    adapters_from_file,
    apply_adapter_file,
    load_adapter,
    save_adapter,
)
from sdtrain.export.metadata import build_metadata
from sdtrain.models.tiny import build_tiny_pipeline



def trained(arch, axis="input", alpha=3.0, rank=4, seed=1):
    """A tiny pipeline with DoRA on UNet + text encoders and random A, B, m."""
    pipe = build_tiny_pipeline(arch, seed=0)
    spec = NetworkSpec(rank=rank, alpha=alpha, decompose_axis=axis, preset="attn-mlp", include=[CONVS],
                       train_text_encoder=True)
    adapters = inject_adapters(pipe.unet, encoders(pipe), arch, spec)
    torch.manual_seed(seed)
    randomize(adapters.modules.values(), up_std=0.05, magnitude_spread=0.1, down_std=0.2)
    return pipe, adapters, spec


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_round_trip_restores_outputs_exactly(tmp_path, arch):
    pipe, adapters, spec = trained(arch, alpha=2.0)  # alpha/rank = 0.5: folding is lossless, bits identical
    expected = outputs(pipe, arch)
    path = save_adapter(adapters, tmp_path / "a.safetensors", dtype="fp32",
                        metadata=build_metadata(arch, spec, output_name="rt"))
    adapter_file = load_adapter(path)
    groups = {"unet", "te1"} | ({"te2"} if arch == "sdxl" else set())
    assert {g for g, _ in kinds(adapter_file)} == groups
    assert {k for _, k in kinds(adapter_file)} >= {"linear", "conv3x3"} | ({"conv1x1"} if arch == "sd15" else set())

    fresh = build_tiny_pipeline(arch, seed=0)
    restored, report = adapters_from_file(adapter_file, fresh.unet, encoders(fresh), arch)
    assert sorted(report.restored) == sorted(adapters.modules) and not report.missing_in_file
    for name, module in adapters.modules.items():
        twin = restored.modules[name]
        assert twin.scale == module.scale and twin.axis == module.axis
        for attr in ("lora_down", "lora_up"):
            assert torch.equal(getattr(twin, attr).weight, getattr(module, attr).weight), (name, attr)
        assert torch.equal(twin.magnitude, module.magnitude)
    for got, want in zip(outputs(fresh, arch), expected):
        assert torch.equal(got, want)


def test_round_trip_with_unfolded_scale_keeps_training_alpha(tmp_path):
    pipe, adapters, spec = trained("sd15", alpha=3.0)  # scale 0.75: lora_up is divided back by it on load
    expected = outputs(pipe, "sd15")
    path = save_adapter(adapters, tmp_path / "a.safetensors", dtype="fp32",
                        metadata=build_metadata("sd15", spec, output_name="rt"))
    fresh = build_tiny_pipeline("sd15", seed=0)
    restored, _ = adapters_from_file(load_adapter(path), fresh.unet, encoders(fresh), "sd15")
    for name, module in adapters.modules.items():
        twin = restored.modules[name]
        assert twin.alpha == 3.0 and twin.rank == 4  # continued training keeps the trained scale
        assert torch.equal(twin.lora_down.weight, module.lora_down.weight)
        torch.testing.assert_close(twin.lora_up.weight, module.lora_up.weight, rtol=3e-7, atol=0)
        assert torch.equal(twin.magnitude, module.magnitude)
    for got, want in zip(outputs(fresh, "sd15"), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fp16_layout(tmp_path):
    pipe, adapters, spec = trained("sd15", axis="output", alpha=3.0)
    path = save_adapter(adapters, tmp_path / "a.safetensors", dtype="fp16",
                        metadata=build_metadata("sd15", spec, output_name="fp16"))
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["ss_network_alpha"] == "3"
    assert len(stored) == 4 * len(adapters.modules)
    for name, module in adapters.modules.items():
        down, up = stored[f"{name}.lora_down.weight"], stored[f"{name}.lora_up.weight"]
        alpha, scale = stored[f"{name}.alpha"], stored[f"{name}.dora_scale"]
        assert (down.dtype, up.dtype, alpha.dtype, scale.dtype) == (torch.float16,) * 2 + (torch.float32,) * 2
        assert alpha.dim() == 0 and alpha.item() == 4.0
        assert torch.equal(down, module.lora_down.weight.detach().half())
        assert torch.equal(up, (module.lora_up.weight.detach() * 0.75).half())
        w = module.base.weight
        want_shape = (w.shape[0], 1) + (1,) * (w.dim() - 2)
        assert tuple(scale.shape) == want_shape and torch.equal(scale.flatten(), module.magnitude.detach())

    fresh = build_tiny_pipeline("sd15", seed=0)
    restored, _ = adapters_from_file(load_adapter(path), fresh.unet, encoders(fresh), "sd15")
    for name, module in restored.modules.items():
        down = stored[f"{name}.lora_down.weight"].double()
        up = stored[f"{name}.lora_up.weight"].double()
        expected = (up.flatten(1) @ down.flatten(1)).reshape(module.base.weight.shape)
        assert (module.delta_weight().double() - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_input_axis_dora_scale_shapes(tmp_path):
    _, adapters, spec = trained("sd15", axis="input")
    path = save_adapter(adapters, tmp_path / "a.safetensors", dtype="bf16")
    with safe_open(str(path), framework="pt") as f:
        for name, module in adapters.modules.items():
            scale = f.get_tensor(f"{name}.dora_scale")
            w = module.base.weight
            assert tuple(scale.shape) == (1, w.shape[1]) + (1,) * (w.dim() - 2)
            assert f.get_tensor(f"{name}.lora_up.weight").dtype == torch.bfloat16


def naive_merged(w0, down, up, alpha, magnitude, axis):
    w0 = w0.double()
    rank = down.shape[0]
    v = w0 + alpha / rank * (up.double().reshape(up.shape[0], rank) @ down.double().reshape(rank, -1)).reshape(w0.shape)
    m = magnitude.double().flatten()
    out = torch.empty_like(v)
    for c in range(m.numel()):
        if axis == "output":
            out[c] = v[c] * m[c] / v[c].norm()
        else:
            out[:, c] = v[:, c] * m[c] / v[:, c].norm()
    return out


def test_foreign_files(tmp_path):
    """OneTrainer-style (1-D magnitude, no alpha, fp16, lora_te1_ on SD1.5) and LyCORIS-style files."""
    pipe = build_tiny_pipeline("sd15", seed=0)
    torch.manual_seed(3)
    ff = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[0].proj  # Linear 32 -> 256
    fc1 = pipe.text_encoder.get_submodule("encoder.layers.0.mlp.fc1")  # Linear 32 -> 128
    conv = pipe.unet.down_blocks[0].resnets[0].conv1  # Conv 3x3 32 -> 32
    q = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q  # Linear 32 -> 32
    names = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": (ff, "input"),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (fc1, "input"),
        "lora_unet_down_blocks_0_resnets_0_conv1": (conv, "output"),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (q, "input"),
    }
    tensors, raw = {}, {}
    for name, (layer, axis) in names.items():
        w = layer.weight.detach()
        rank = 2 if "conv" in name else 4
        down = torch.randn(rank, *w.shape[1:]) * 0.2
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else [])) * 0.05
        channels = w.shape[0] if axis == "output" else w.shape[1]
        magnitude = torch.rand(channels) + 0.5
        if "conv" in name:  # LyCORIS style: [out, 1, 1, 1] fp32, alpha != rank
            tensors[f"{name}.alpha"] = torch.tensor(8.0)
            stored_scale = magnitude.reshape(-1, 1, 1, 1)
        else:  # OneTrainer style: 1-D fp16, no alpha
            stored_scale = magnitude.half()
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.dora_scale"] = stored_scale
        alpha = 8.0 if "conv" in name else float(rank)
        raw[name] = (w.clone(), down.half(), up.half(), alpha, stored_scale.float(), axis)
    path = tmp_path / "foreign.safetensors"
    save_file(tensors, str(path))

    adapter_file = load_adapter(path)
    assert adapter_file.axis == "mixed" and adapter_file.arch == "sd15"
    square = adapter_file.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert square.axis == "input" and square.axis_guessed  # 1-D on a square layer: the input-axis convention
    assert adapter_file.modules["lora_unet_down_blocks_0_resnets_0_conv1"].axis == "output"
    adapters, report = adapters_from_file(adapter_file, pipe.unet, [pipe.text_encoder], "sd15")
    assert len(report.restored) == 4
    for name, (w0, down, up, alpha, magnitude, axis) in raw.items():
        module = adapters.modules[name.replace("lora_te1_", "lora_te_")]
        assert module.axis == axis
        torch.testing.assert_close(module.merged_weight().double(), naive_merged(w0, down, up, alpha, magnitude, axis),
                                   rtol=1e-5, atol=1e-6)

    # metadata can settle the ambiguous square case
    hinted = adapter_file_from_tensors(tensors, {"ss_network_args": '{"wd_on_output": "True"}'})
    assert hinted.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].axis == "output"


def test_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_adapter(junk)
    other = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ModelLoadError, match="not a kohya/LyCORIS"):
        load_adapter(other)
    with pytest.raises(ModelLoadError, match="ranks differ"):
        adapter_file_from_tensors({"lora_unet_x.lora_down.weight": torch.zeros(4, 8),
                                   "lora_unet_x.lora_up.weight": torch.zeros(8, 2)})

    _, adapters, _ = trained("sd15", axis="output")
    path = save_adapter(adapters, tmp_path / "out.safetensors", dtype="fp32")
    pipe = build_tiny_pipeline("sd15", seed=0)
    spec = NetworkSpec(rank=4, alpha=3.0, decompose_axis="input", preset="attn-mlp", include=[CONVS],
                       train_text_encoder=True)
    other_axis = inject_adapters(pipe.unet, encoders(pipe), "sd15", spec)
    with pytest.raises(ModelLoadError, match='network.decompose_axis = "output"'):
        apply_adapter_file(load_adapter(path), other_axis)
    fewer = trained("sd15")[1]
    fewer.modules.pop(next(iter(fewer.modules)))
    with pytest.raises(ModelLoadError, match="adapt different layers"):
        apply_adapter_file(load_adapter(path), fewer)


def test_plain_lora_round_trip(tmp_path):
    pipe = build_tiny_pipeline("sd15", seed=0)
    spec = NetworkSpec(type="lora", rank=4, alpha=3.0, preset="attn")
    adapters = inject_adapters(pipe.unet, [pipe.text_encoder], "sd15", spec)
    torch.manual_seed(6)
    with torch.no_grad():
        for module in adapters.modules.values():
            module.lora_up.weight.normal_(0, 0.05)
    expected = outputs(pipe, "sd15")
    path = save_adapter(adapters, tmp_path / "lora.safetensors", dtype="fp32",
                        metadata=build_metadata("sd15", spec, output_name="lora"))
    adapter_file = load_adapter(path)
    assert adapter_file.axis is None and not any(k.endswith("dora_scale") for k in safe_open(str(path), "pt").keys())
    fresh = build_tiny_pipeline("sd15", seed=0)
    restored, _ = adapters_from_file(adapter_file, fresh.unet, [fresh.text_encoder], "sd15")
    assert all(m.magnitude is None and m.alpha == 3.0 for m in restored.modules.values())
    for got, want in zip(outputs(fresh, "sd15"), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
