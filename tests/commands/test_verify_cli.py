"""`sdtrain verify` and `sdtrain inspect` through the CLI entry point (in process)."""

from __future__ import annotations

import pytest
import torch

from helpers_adapters import randomize
from sdtrain.adapters.inject import NetworkSpec, inject_adapters
from sdtrain.cli import main
from sdtrain.export.adapter_file import save_adapter
from sdtrain.export.metadata import build_metadata
from sdtrain.models.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input- and output-axis DoRA files for the tiny SD1.5 model (attention layers + text encoder)."""
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for axis in ("input", "output"):
        pipe = build_tiny_pipeline("sd15", seed=0)  # the same weights as builtin:tiny-sd15
        spec = NetworkSpec(rank=4, alpha=2.0, decompose_axis=axis, preset="attn", train_text_encoder=True)
        adapters = inject_adapters(pipe.unet, [pipe.text_encoder], "sd15", spec)
        torch.manual_seed(5)
        randomize(adapters.modules.values(), up_std=0.02, magnitude_spread=0.05)
        meta = build_metadata("sd15", spec, output_name=f"style_{axis}", tag_frequency={"imgs": {"cat": 2}})
        paths[axis] = save_adapter(adapters, folder / f"{axis}.safetensors", dtype="fp16", metadata=meta)
    return paths


def test_verify_input_axis_passes(files, capsys):
    code = main(["verify", str(files["input"]), "--base", "builtin:tiny-sd15", "--target", "comfyui,a1111,lycoris"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("* ")}
    assert set(rows) == {"comfyui", "a1111", "lycoris"}
    assert all(" exact " in row for row in rows.values())
    assert "result: ok" in out


def test_verify_output_axis_fails_for_a1111(files, capsys):
    code = main(["verify", str(files["output"]), "--base", "builtin:tiny-sd15"])
    out = capsys.readouterr().out
    assert code == 1
    a1111 = next(line for line in out.splitlines() if line.startswith("* a1111 "))
    assert "incompatible" in a1111 and 'decompose_axis = "input"' in a1111
    comfy = next(line for line in out.splitlines() if line.startswith("* comfyui "))
    assert "approximate" in comfy
    code = main(["verify", str(files["output"]), "--base", "builtin:tiny-sd15", "--target", "lycoris,comfyui-fixed"])
    assert code == 0


def test_verify_user_errors(files, tmp_path, capsys):
    assert main(["verify", str(files["input"]), "--base", "builtin:tiny-sd15", "--target", "comfy"]) == 2
    assert "accepted: comfyui" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nope.safetensors"), "--base", "builtin:tiny-sd15"]) == 2
    assert "not found" in capsys.readouterr().err


def test_inspect(files, capsys):
    assert main(["inspect", str(files["output"])]) == 0
    out = capsys.readouterr().out
    assert "DoRA axis output" in out and "arch sd15" in out
    assert "down float16" in out and "dora_scale float32" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("unet ", "te1 "))}
    assert set(lines) == {"unet", "te1"} and lines["unet"][3] == "0"  # attention only: no conv
    assert "ss_output_name = style_output" in out and "sshs_model_hash = " in out
    assert "training alpha 2" in out
    assert "<1 folder(s), 1 tag(s)" in out


def test_cli_target_list_matches_the_loaders():
    from sdtrain.commands import verify as command
    from sdtrain.export import verify

    assert command.TARGETS == tuple(verify.LOADERS)
    assert command.DEFAULT_TARGETS == verify.DEFAULT_TARGETS
