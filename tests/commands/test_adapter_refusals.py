"""merge, verify, export, analyze and train --init-from refuse malformed and NaN/inf adapters before any model
loads (exit 2, the file, the keys and the fix); inspect shows a NaN/inf adapter with its counts and exits 1."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers_training import write_config
from sdtrain.cli import main

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"


def tensors():
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in (Q, K):
        out.update({f"{name}.lora_down.weight": torch.randn(4, 32, generator=gen) * 0.1,
                    f"{name}.lora_up.weight": torch.randn(32, 4, generator=gen) * 0.1,
                    f"{name}.alpha": torch.tensor(4.0),
                    f"{name}.dora_scale": torch.rand(32, 1, generator=gen) + 0.5})
    return out


@pytest.fixture
def files(tmp_path):
    nan = tensors()
    nan[f"{Q}.lora_up.weight"][3, :2] = float("nan")
    nan[f"{K}.dora_scale"][0] = float("inf")
    save_file(nan, str(tmp_path / "nan.safetensors"), {"ss_network_alpha": "4"})
    alpha2 = tensors()
    alpha2[f"{K}.alpha"] = torch.tensor([4.0, 4.0])
    save_file(alpha2, str(tmp_path / "alpha2.safetensors"))
    return {"nan": tmp_path / "nan.safetensors", "alpha2": tmp_path / "alpha2.safetensors"}


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the refusal must come first."""
    import sdtrain.models.loading

    def load_base(*args, **kwargs):
        raise AssertionError("a model was loaded before the adapter was checked")

    monkeypatch.setattr(sdtrain.models.loading, "load_base", load_base)


EXPECTED = {
    "nan": ["2 of 8 tensors in 2 module(s) hold NaN/inf (2 NaN, 1 inf)", f"{Q}.lora_up.weight (2 NaN)",
            f"{K}.dora_scale (1 inf)", "use an earlier save"],
    "alpha2": ["alpha holds more than one number: 1 key(s): ", f"{K}.alpha [2]", "re-export or re-download"],
}


def commands(tmp_path, adapter):
    return {
        "merge": ["merge", adapter, "--base", "builtin:tiny-sd15", "--out", str(tmp_path / "merged")],
        "verify": ["verify", adapter, "--base", "builtin:tiny-sd15"],
        "export": ["export", adapter, "--base", "builtin:tiny-sd15", "--target", "comfyui",
                   "--out", str(tmp_path / "exported.safetensors")],
        "analyze": ["analyze", adapter, "--base", "builtin:tiny-sd15", "--out", str(tmp_path / "analysis")],
        "init-from": ["train", write_config(tmp_path, "run", steps=1), "--init-from", adapter],
    }


@pytest.mark.parametrize("kind", ["nan", "alpha2"])
@pytest.mark.parametrize("command", ["merge", "verify", "export", "analyze", "init-from"])
def test_refused_before_the_model_loads(files, no_model, tmp_path, capsys, command, kind):
    path = str(files[kind])
    assert main(commands(tmp_path, path)[command]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {path}: ") and "Traceback" not in captured.err + captured.out
    for text in EXPECTED[kind]:
        assert text in captured.err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "exported.safetensors").exists()
    assert not (tmp_path / "analysis").exists() and not (tmp_path / "run").exists()


def test_inspect_shows_a_non_finite_adapter_and_exits_1(files, capsys):
    assert main(["inspect", str(files["nan"]), "--modules"]) == 1
    out = capsys.readouterr().out
    assert ("NaN/inf  2 of 8 tensors in 2 of 2 modules hold NaN/inf (2 NaN, 1 inf): "
            f"{K}.dora_scale (1 inf), {Q}.lora_up.weight (2 NaN)") in out
    assert "merge, verify, export, analyze and --init-from refuse it" in out
    module_lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  lora_")}
    assert module_lines[Q].endswith("  NaN/inf") and module_lines[K].endswith("  NaN/inf")
    assert "ss_network_alpha = 4" in out  # the rest of the description is there


def test_inspect_refuses_a_malformed_adapter(files, capsys):
    assert main(["inspect", str(files["alpha2"])]) == 2
    assert "alpha holds more than one number" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["merge", "verify"])
def test_non_finite_strength_is_refused(files, no_model, tmp_path, capsys, command):
    good = tmp_path / "good.safetensors"
    save_file(tensors(), str(good))
    argv = commands(tmp_path, str(good))[command] + ["--strength", "nan"]
    assert main(argv) == 2
    assert "--strength nan is not a finite number" in capsys.readouterr().err
