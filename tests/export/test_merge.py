"""`sdtrain merge`: the baked model, loaded back by diffusers, reproduces the adapter's outputs."""

from __future__ import annotations

import pytest
import torch

from helpers_adapters import encoders, outputs, randomize
from sdtrain.adapters.inject import NetworkSpec, inject_adapters
from sdtrain.cli import main
from sdtrain.export.adapter_file import adapters_from_file, load_adapter, save_adapter
from sdtrain.models.tiny import build_tiny_pipeline, save_tiny_pipeline

CONVS = "re:(down_blocks_0_resnets_0_conv1|input_blocks_1_0_in_layers_2)$"


def adapter(tmp_path, arch, axis):
    pipe = build_tiny_pipeline(arch, seed=0)
    spec = NetworkSpec(rank=4, alpha=3.0, decompose_axis=axis, preset="attn", include=[CONVS], train_text_encoder=True)
    adapters = inject_adapters(pipe.unet, encoders(pipe), arch, spec)
    torch.manual_seed(4)
    randomize(adapters.modules.values(), up_std=0.05, magnitude_spread=0.1)
    return save_adapter(adapters, tmp_path / f"{arch}.safetensors", dtype="fp32")


def expected_outputs(path, arch, strength=1.0):
    """Base + adapter through sdtrain's own adapter modules (not merged)."""
    pipe = build_tiny_pipeline(arch, seed=0)
    adapters, _ = adapters_from_file(load_adapter(path), pipe.unet, encoders(pipe), arch)
    adapters.set_multiplier(strength)
    return outputs(pipe, arch), outputs(build_tiny_pipeline(arch, seed=0), arch)


def assert_reproduces(got, want, base):
    for g, w, b in zip(got, want, base):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        assert (w - b).abs().max() > 100 * (g - w).abs().max()  # the adapter's effect is there, not the base


def test_merge_to_diffusers_folder(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    path = adapter(tmp_path, "sd15", "input")
    out = tmp_path / "merged"
    assert main(["merge", str(path), "--base", "builtin:tiny-sd15-random", "--out", str(out), "--dtype", "fp32"]) == 0
    assert "merged" in capsys.readouterr().out
    loaded = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    want, base = expected_outputs(path, "sd15")
    assert_reproduces(outputs(loaded, "sd15"), want, base)
    # refuses to overwrite unless asked
    assert main(["merge", str(path), "--base", "builtin:tiny-sd15-random", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(path), "--base", "builtin:tiny-sd15-random", "--out", str(out), "--dtype", "fp32",
                 "--strength", "0.5", "--overwrite"]) == 0
    half = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    want_half, _ = expected_outputs(path, "sd15", strength=0.5)
    assert_reproduces(outputs(half, "sd15"), want_half, base)


def test_merge_to_single_file(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path = adapter(tmp_path, "sdxl", "output")
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(path), "--base", "builtin:tiny-sdxl-random", "--out", str(out), "--dtype", "fp32"]) == 0
    config = save_tiny_pipeline("sdxl", tmp_path / "config")
    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(config), local_files_only=True)
    want, base = expected_outputs(path, "sdxl")
    assert_reproduces(outputs(loaded, "sdxl"), want, base)


def test_merge_into_the_wrong_base_fails(tmp_path, capsys):
    path = adapter(tmp_path, "sd15", "input")
    assert main(["merge", str(path), "--base", "builtin:tiny-sdxl", "--out", str(tmp_path / "x")]) == 2
    assert "have no layer in this sdxl base" in capsys.readouterr().err


def overflowing(tmp_path, name, up, down):
    """A finite plain-LoRA file on one tiny SD1.5 layer whose merged weight is about 4·up·down."""
    from safetensors.torch import save_file

    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32
    path = tmp_path / name
    save_file({f"{layer}.lora_down.weight": torch.full((4, 32), down), f"{layer}.lora_up.weight": torch.full((32, 4), up),
               f"{layer}.alpha": torch.tensor(4.0)}, str(path))
    return path, layer


def test_merge_never_writes_non_finite_weights_and_keeps_the_old_output(tmp_path, capsys):
    good = adapter(tmp_path, "sd15", "input")
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(good), "--base", "builtin:tiny-sd15", "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()

    # finite in fp32 (4·1e3·1e2 = 4e5), inf in fp16
    fp16_inf, layer = overflowing(tmp_path, "fp16-inf.safetensors", 1e3, 1e2)
    assert main(["merge", str(fp16_inf), "--base", "builtin:tiny-sd15", "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"error: {fp16_inf}: nothing written: 1 merged weight(s) overflow --dtype fp16" in err
    assert f"{layer} (1024 inf)" in err and "use --dtype bf16 or fp32" in err
    # the same file merges in bf16
    bf16 = tmp_path / "merged-bf16.safetensors"
    assert main(["merge", str(fp16_inf), "--base", "builtin:tiny-sd15", "--out", str(bf16), "--dtype", "bf16"]) == 0

    # a finite file whose merge is inf even in fp32 (4·1e20·1e20 = 4e40)
    fp32_inf, _ = overflowing(tmp_path, "fp32-inf.safetensors", 1e20, 1e20)
    assert main(["merge", str(fp32_inf), "--base", "builtin:tiny-sd15", "--out", str(out), "--overwrite",
                 "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert f"error: {fp32_inf}: nothing written: 1 merged weight(s) hold NaN/inf (1024 inf): {layer}" in err
    assert "lower --strength" in err

    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("merged*")) == ["merged-bf16.safetensors", "merged.safetensors"]
    assert not list(tmp_path.glob(".merged*"))  # no temporary left behind


def test_merge_refuses_a_base_that_is_not_finite_in_the_saved_dtype(tmp_path):
    from sdtrain.export.adapter_file import NonFiniteAdapter
    from sdtrain.export.merge import save_merged
    from sdtrain.models.loading import load_base

    base = load_base("builtin:tiny-sd15")
    with torch.no_grad():
        base.vae.decoder.conv_out.weight[0, 0, 0, 0] = 1e6  # beyond fp16
    out = tmp_path / "merged"
    with pytest.raises(NonFiniteAdapter, match=r"vae.decoder.conv_out.weight \(1 inf\)"):
        save_merged(base, out, dtype="fp16")
    assert not out.exists() and not list(tmp_path.iterdir())
