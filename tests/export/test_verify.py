"""`verify` on the tiny SD1.5 / SDXL models: loader verdicts, key coverage, and diffusers' own loader.

Key coverage is checked against the tensors of the actual single-file state dict; the diffusers replay
against `pipe.load_lora_weights` + `fuse_lora`.
"""

from __future__ import annotations

import types

import pytest
import torch

from helpers_adapters import CONVS, encoders, module_kinds, randomize
from sdtrain.adapters.inject import NetworkSpec, inject_adapters
from sdtrain.adapters.names import module_index
from sdtrain.export.adapter_file import load_adapter, save_adapter
from sdtrain.export.metadata import build_metadata
from sdtrain.export.verify import verify_adapter, verify_saved_adapter
from sdtrain.models.ldm_layout import pipeline_to_single_file_state_dict
from sdtrain.models.tiny import build_tiny_pipeline


def base_of(pipe, arch):
    """What verify needs of a `load_base` result, built from a pipeline."""
    return types.SimpleNamespace(arch=arch, unet=pipe.unet, text_encoders=encoders(pipe), source=f"tiny {arch}")


def adapter_path(tmp_path, arch, axis, preset="attn-mlp", include=(CONVS,), target=None):
    pipe = build_tiny_pipeline(arch, seed=0)
    spec = NetworkSpec(rank=4, alpha=3.0, decompose_axis=axis, preset=preset, include=list(include),
                       train_text_encoder=True)
    adapters = inject_adapters(pipe.unet, encoders(pipe), arch, spec)
    torch.manual_seed(2)
    randomize(adapters.modules.values(), up_std=0.02, magnitude_spread=0.05)
    path = save_adapter(adapters, tmp_path / f"{arch}_{axis}_{target}.safetensors", dtype="fp32", target=target,
                        metadata=build_metadata(arch, spec, output_name=f"{arch}_{axis}"))
    return path, adapters


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_input_axis_exact_everywhere(tmp_path, arch):
    path, _ = adapter_path(tmp_path, arch, "input")
    adapter_file = load_adapter(path)
    kinds = module_kinds(adapter_file)
    assert {("unet", "linear"), ("unet", "conv3x3"), ("te1", "linear")} <= kinds
    assert ("unet", "conv1x1") in kinds if arch == "sd15" else ("te2", "linear") in kinds
    report = verify_adapter(adapter_file, base_of(build_tiny_pipeline(arch, seed=0), arch),
                            targets=["comfyui", "forge", "a1111"])
    print(report.format())
    for target in ("comfyui", "forge", "comfyui-fixed"):
        result = report.result(target)
        assert result.verdict == "exact" and result.max_rel_error <= 1e-6, target
        assert (result.matched, result.unmatched) == (len(adapter_file.modules), 0)
    a1111 = report.result("a1111")
    assert a1111.verdict == "exact" and 0 < a1111.max_rel_error <= 4e-3  # fp16 rounding, reported
    assert report.result("diffusers").verdict == "incompatible"  # magnitudes dropped
    lycoris = report.result("lycoris")  # the package refuses input-axis files
    assert lycoris.verdict == "incompatible" and lycoris.failures and "output-axis modules only" in lycoris.remedy
    assert report.exit_code() == 0
    assert "exact in: comfyui, forge, comfyui-fixed, a1111, a1111-1.9" in report.format()


def test_output_axis_verdicts(tmp_path):
    """A file that records no target holds the magnitude: exact in LyCORIS, off in today's ComfyUI and Forge."""
    path, _ = adapter_path(tmp_path, "sdxl", "output")
    report = verify_adapter(path, base_of(build_tiny_pipeline("sdxl", seed=0), "sdxl"))
    text = report.format()
    print(text)
    assert report.requested == ["comfyui"]  # no target recorded: ComfyUI
    assert report.result("lycoris").verdict == "exact" and report.result("lycoris").max_rel_error <= 1e-6
    assert report.result("comfyui-fixed").verdict == "exact"
    for name in ("comfyui", "forge"):
        current = report.result(name)
        assert current.verdict == "approximate" and current.max_rel_error > 1e-4
        assert f"--target {name}" in current.remedy and "install-" in current.remedy
    a1111 = report.result("a1111")
    assert a1111.verdict == "incompatible" and "sdtrain install-webui" in a1111.remedy
    assert 'decompose_axis = "input"' in a1111.remedy
    assert report.not_exact_requested() == ["comfyui"] and report.exit_code() == 1
    assert "exact in: comfyui-fixed, lycoris" in text and "result: NOT exact in comfyui (requested)" in text
    assert f"sdtrain export {path} --base tiny sdxl --target comfyui" in text


def test_wrong_base_is_incompatible(tmp_path):
    path, _ = adapter_path(tmp_path, "sd15", "input", preset="attn", include=())
    report = verify_adapter(path, base_of(build_tiny_pipeline("sdxl", seed=0), "sdxl"), targets=["lycoris"])
    result = report.result("lycoris")
    assert result.verdict == "incompatible" and result.unmatched > 0
    assert report.exit_code() == 1
    assert "trained on sd15, the base is sdxl" in report.format()


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_every_module_maps_to_its_single_file_key(tmp_path, arch):
    path, adapters = adapter_path(tmp_path, arch, "input", preset="full", include=())
    pipe = build_tiny_pipeline(arch, seed=0)
    checkpoint = pipeline_to_single_file_state_dict(pipe, arch)
    report = verify_adapter(path, base_of(pipe, arch), targets=["lycoris"])
    coverage = report.coverage
    assert not coverage.unmatched and len(coverage.matched) == len(adapters.modules)
    groups = {adapters.groups[n] for n in adapters.modules}
    assert groups == ({"unet", "te1", "te2"} if arch == "sdxl" else {"unet", "te1"})
    index = module_index(arch, pipe.unet, encoders(pipe))
    roots = {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": getattr(pipe, "text_encoder_2", None)}
    sliced = 0
    for name, where in coverage.matched.items():
        key, _, rows = where.partition("[")
        tensor = checkpoint[key]
        if rows:
            start, stop = (int(x) for x in rows.rstrip("]").split(":"))
            tensor, sliced = tensor[start:stop], sliced + 1
        component, module_path = index[name]
        weight = roots[component].get_submodule(module_path).weight
        assert torch.equal(tensor.reshape(weight.shape), weight), name  # the key holds this very weight
    assert sliced == (3 * 3 if arch == "sdxl" else 0)  # CLIP-G q/k/v live in fused in_proj rows


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_load_lora_weights_accepts_the_file(tmp_path, arch):
    from sdtrain.export import ui_rules

    path, adapters = adapter_path(tmp_path, arch, "input")
    adapter_file = load_adapter(path)
    pipe = build_tiny_pipeline(arch, seed=0)
    roots = {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": getattr(pipe, "text_encoder_2", None)}
    index = module_index(arch, pipe.unet, encoders(pipe))
    base_weights = {n: roots[c].get_submodule(p).weight.detach().clone() for n, (c, p) in index.items()
                    if n in adapter_file.modules}
    pipe.load_lora_weights(str(path))
    loaded = sum(name.endswith("lora_A") for root in roots.values() if root is not None
                 for name, _ in root.named_modules())
    assert loaded == len(adapter_file.modules)  # every module, magnitudes dropped
    pipe.fuse_lora(components=["unet", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else []))
    for name, tensors in adapter_file.modules.items():
        component, module_path = index[name]
        layer = roots[component].get_submodule(module_path)
        fused = getattr(layer, "base_layer", layer).weight.detach()
        replay = ui_rules.diffusers_plain(base_weights[name], tensors.down, tensors.up, tensors.alpha, tensors.dora_scale)
        torch.testing.assert_close(fused, replay, rtol=1e-6, atol=1e-7)


def test_training_run_check(tmp_path):
    path, adapters = adapter_path(tmp_path, "sd15", "input", preset="attn", include=())
    adapters.merge_all()  # the check must see through merged modules
    report = verify_saved_adapter(path, adapters, targets=["comfyui"])
    assert report.result("comfyui").verdict == "exact"
    assert "comfyui: exact" in report.summary()
    adapters.unmerge_all()
