"""`sdtrain verify`, `sdtrain export` and `sdtrain inspect` through the CLI entry point (in process)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from helpers_adapters import randomize
from sdtrain.adapters.inject import NetworkSpec, inject_adapters
from sdtrain.cli import main
from sdtrain.export.adapter_file import save_adapter
from sdtrain.export.metadata import build_metadata
from sdtrain.models.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """DoRA files for the tiny SD1.5 model (attention layers + text encoder): input axis written for "portable",
    output axis written for "comfyui", and an output-axis file that records no target (the magnitude itself)."""
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for key, axis, target in (("input", "input", "portable"), ("output", "output", "comfyui"),
                              ("plain-output", "output", None)):
        pipe = build_tiny_pipeline("sd15", seed=0)  # the same weights as builtin:tiny-sd15
        spec = NetworkSpec(rank=4, alpha=2.0, decompose_axis=axis, preset="attn", train_text_encoder=True)
        adapters = inject_adapters(pipe.unet, [pipe.text_encoder], "sd15", spec)
        torch.manual_seed(5)
        randomize(adapters.modules.values(), up_std=0.02, magnitude_spread=0.05)
        meta = build_metadata("sd15", spec, output_name=f"style_{axis}", tag_frequency={"imgs": {"cat": 2}})
        paths[key] = save_adapter(adapters, folder / f"{key}.safetensors", dtype="fp16", metadata=meta, target=target)
    return paths


def requested_rows(out: str) -> dict[str, str]:
    return {line.split()[1]: line for line in out.splitlines() if line.startswith("* ")}


def verify(capsys, path, *target) -> tuple[int, str]:
    code = main(["verify", str(path), "--base", "builtin:tiny-sd15", *(["--target", *target] if target else [])])
    return code, capsys.readouterr().out


def test_verify_defaults_to_the_consumers_the_target_claims(files, capsys):
    code, out = verify(capsys, files["input"])
    assert code == 0, out
    assert set(requested_rows(out)) == {"comfyui", "forge", "a1111"}  # what "portable" is written for
    assert all(" exact " in row for row in requested_rows(out).values())
    assert "result: exact in every requested consumer (comfyui, forge, a1111)" in out
    code, out = verify(capsys, files["output"])
    assert code == 0, out
    assert set(requested_rows(out)) == {"comfyui", "forge"} and "target   comfyui (dora_scale rule: comfyui-w0-norm)" in out


@pytest.mark.parametrize("key,target,code", [
    ("input", "comfyui,a1111,lycoris", 1),  # LyCORIS refuses input-axis files
    ("input", "forge,comfyui-fixed,a1111-1.9", 0),
    ("output", "a1111", 1),
    ("output", "lycoris,comfyui-fixed", 1),  # approximate: the file compensates ComfyUI's |W0| rule
    ("output", "forge", 0),
    ("plain-output", "comfyui", 1),
    ("plain-output", "lycoris,comfyui-fixed", 0),
    ("plain-output", "all", 1),
])
def test_verify_exit_code_is_0_only_when_every_requested_consumer_is_exact(files, capsys, key, target, code):
    got, out = verify(capsys, files[key], target)
    assert got == code, out
    assert ("result: NOT exact in" in out) == (code == 1)


def test_verify_names_the_fix_for_each_inexact_consumer(files, capsys):
    _, out = verify(capsys, files["output"], "a1111")
    fixes = {line.split(":")[0].strip(): line for line in out.split("not exact:\n", 1)[1].splitlines() if line.startswith("  ")}
    assert "sdtrain install-webui WEBUI_DIR" in fixes["a1111"] and 'decompose_axis = "input"' in fixes["a1111"]
    assert f"sdtrain export {files['output']} --base builtin:tiny-sd15 --target lycoris" in fixes["lycoris"]
    assert "sdtrain merge" in fixes["diffusers"]
    assert "result: NOT exact in a1111 (requested)" in out
    _, out = verify(capsys, files["plain-output"])
    assert "sdtrain install-comfyui COMFYUI_DIR" in out and "--target comfyui`" in out


def test_export_retargets_and_verifies(files, tmp_path, capsys):
    out_path = tmp_path / "for-lycoris.safetensors"
    code = main(["export", str(files["output"]), "--base", "builtin:tiny-sd15", "--target", "lycoris", "--out", str(out_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"wrote {out_path} for target lycoris" in out and "result: exact in every requested consumer (lycoris)" in out
    assert verify(capsys, out_path, "lycoris,comfyui-fixed")[0] == 0
    assert verify(capsys, out_path, "comfyui")[0] == 1
    # back to the comfyui encoding: the same dora_scale as the file written for it at save time
    back = tmp_path / "back.safetensors"
    assert main(["export", str(out_path), "--base", "builtin:tiny-sd15", "--target", "comfyui", "--out", str(back)]) == 0
    capsys.readouterr()
    with safe_open(str(back), "pt") as a, safe_open(str(files["output"]), "pt") as b:
        scales = [k for k in a.keys() if k.endswith(".dora_scale")]
        assert scales and all(torch.allclose(a.get_tensor(k), b.get_tensor(k), rtol=1e-6, atol=0) for k in scales)
        assert a.metadata()["sdtrain_target"] == "comfyui" and a.metadata()["ss_output_name"] == "style_output"


def test_export_user_errors(files, tmp_path, capsys):
    code = main(["export", str(files["output"]), "--base", "builtin:tiny-sd15", "--target", "a1111",
                 "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and 'network.decompose_axis = "input"' in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    code = main(["export", str(files["input"]), "--base", "builtin:tiny-sd15", "--target", "lycoris",
                 "--out", str(tmp_path / "y.safetensors")])
    assert code == 2 and "output-axis modules only" in capsys.readouterr().err
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    code = main(["export", str(files["input"]), "--base", "builtin:tiny-sd15", "--target", "a1111", "--out", str(taken)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err and taken.read_bytes() == b"x"


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


def test_cli_and_config_lists_match_the_loaders_and_targets():
    from sdtrain.commands import export as export_command
    from sdtrain.commands import verify as command
    from sdtrain.config import schema
    from sdtrain.export import targets, verify

    assert command.TARGETS == tuple(verify.LOADERS) == schema.CONSUMERS == tuple(targets.EXACT_IN)
    assert export_command.TARGETS == tuple(targets.TARGETS) == schema.EXPORT_TARGETS
    assert schema.SaveConfig().target == targets.DEFAULT_TARGET
