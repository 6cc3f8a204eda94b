"""Adapter metadata (kohya ss_*, modelspec.*), the sshs hashes recomputed independently, atomic writes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from sdtrain.adapters.inject import NetworkSpec
from sdtrain.export import adapter_file
from sdtrain.export.metadata import build_metadata, file_hashes


def spec(axis="input", **kw):
    return NetworkSpec(rank=8, alpha=4.0, decompose_axis=axis, **kw)


def tensors(n_bytes: int = 4096):
    torch.manual_seed(0)
    count = n_bytes // 4
    return {"lora_unet_a.lora_down.weight": torch.randn(4, count // 8),
            "lora_unet_a.lora_up.weight": torch.randn(count // 8, 4),
            "lora_unet_a.alpha": torch.tensor(4.0)}


def tensor_section(data: bytes) -> bytes:
    (header_len,) = struct.unpack("<Q", data[:8])
    return data[8 + header_len:]


def test_kohya_and_modelspec_keys():
    start = dt.datetime(2026, 7, 1, 12, 0, tzinfo=dt.timezone.utc)
    meta = build_metadata(
        "sdxl", spec("output", conv_rank=4, conv_alpha=2.0), output_name="my_style",
        tag_frequency={"img": {"cat": 3, "dog": 1}}, resolution=[1024, 768], num_train_images=12, steps=300,
        max_steps=300, epoch=5, started_at=start, finished_at=start.timestamp() + 60, prediction_type="v_prediction",
        config={"network": {"rank": 8}, "seed": 1},
    )
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["ss_base_model_version"].startswith("sdxl_")
    assert meta["ss_output_name"] == "my_style"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4")
    args = json.loads(meta["ss_network_args"])
    assert args["dora_wd"] == "True" and args["wd_on_output"] == "True"
    assert (args["conv_dim"], args["conv_alpha"]) == ("4", "2")
    assert json.loads(meta["ss_tag_frequency"]) == {"img": {"cat": 3, "dog": 1}}
    assert meta["ss_resolution"] == "(1024, 768)" and meta["modelspec.resolution"] == "1024x768"
    assert (meta["ss_num_train_images"], meta["ss_steps"], meta["ss_epoch"]) == ("12", "300", "5")
    assert float(meta["ss_training_started_at"]) == start.timestamp()
    assert float(meta["ss_training_finished_at"]) == start.timestamp() + 60
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.title"] == "my_style"
    assert meta["modelspec.date"].startswith("2026-07-01T12:01")
    assert json.loads(meta["sdtrain_config"]) == {"network": {"rank": 8}, "seed": 1}

    sd = build_metadata("sd15", spec("input"), output_name="x")
    assert sd["ss_base_model_version"] == "sd_v1" and not sd["ss_base_model_version"].startswith("sdxl_")
    assert json.loads(sd["ss_network_args"])["wd_on_output"] == "False"
    assert sd["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert sd["modelspec.prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="unknown architecture"):
        build_metadata("sd3", spec(), output_name="x")


@pytest.mark.parametrize("size", [4096, 1_300_000])
def test_hashes_equal_a_recomputation(tmp_path, size):
    meta = build_metadata("sd15", spec(), output_name="hashme", tag_frequency={"d": {"a": 1}})
    path = adapter_file.write_adapter_tensors(tensors(size), tmp_path / "a.safetensors", meta)
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
    data = path.read_bytes()
    assert stored["sshs_model_hash"] == hashlib.sha256(tensor_section(data)).hexdigest()
    assert stored["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    if size < 0x100000:
        assert stored["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    assert file_hashes(path) == {k: stored[k] for k in ("sshs_model_hash", "sshs_legacy_hash")}
    assert stored["ss_output_name"] == "hashme"
    for key, value in meta.items():
        assert stored[key] == value


def test_model_hash_ignores_metadata(tmp_path):
    a = adapter_file.write_adapter_tensors(tensors(), tmp_path / "a.safetensors", {"ss_output_name": "a"})
    b = adapter_file.write_adapter_tensors(tensors(), tmp_path / "b.safetensors", {"ss_output_name": "bbbb", "x": "y"})
    assert file_hashes(a)["sshs_model_hash"] == file_hashes(b)["sshs_model_hash"]
    changed = tensors()
    changed["lora_unet_a.alpha"] = torch.tensor(5.0)
    c = adapter_file.write_adapter_tensors(changed, tmp_path / "c.safetensors", {"ss_output_name": "a"})
    assert file_hashes(c)["sshs_model_hash"] != file_hashes(a)["sshs_model_hash"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"
    adapter_file.write_adapter_tensors(tensors(), path, {"ss_output_name": "old"})
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        adapter_file.write_adapter_tensors(tensors(), path, {"ss_output_name": "new"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temporary left behind
    monkeypatch.undo()
    adapter_file.write_adapter_tensors(tensors(), path, {"ss_output_name": "new"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["ss_output_name"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


# ---------------------------------------------------------------- no local paths in shared files


def test_shareable_path():
    from sdtrain.export.metadata import shareable_path

    assert shareable_path("/home/user/project/data/char", "/home/user/project") == "data/char"
    assert shareable_path("/home/user/project/", "/home/user/project") == "."
    assert shareable_path("/home/user/other/char/", "/home/user/project") == "char"
    assert shareable_path("/home/user/projectX/char", "/home/user/project") == "char"  # not inside, only a prefix
    assert shareable_path("/home/user/models/sdxl.safetensors") == "sdxl.safetensors"
    assert shareable_path("~/models/sd15") == "sd15"
    assert shareable_path("C:\\Users\\me\\models\\sd15.safetensors", "/home/user") == "sd15.safetensors"
    assert shareable_path("\\\\server\\share\\data") == "data"
    for kept in ("stabilityai/stable-diffusion-xl-base-1.0", "builtin:tiny-sdxl", "relative/path", ""):
        assert shareable_path(kept, "/home/user") == kept


def string_values(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from string_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from string_values(item)
    elif isinstance(value, str):
        yield value


def test_config_metadata_has_no_absolute_paths(tmp_path):
    from helpers_training import write_config
    from sdtrain.config import config_to_dict, load_config

    cfg = load_config(write_config(tmp_path, "run", steps=1))
    config = config_to_dict(cfg)
    assert config["data"]["subsets"][0]["path"] == str(tmp_path / "data")  # resolved: absolute

    meta = build_metadata("sdxl", spec(), output_name="run", config=config, base_model_name=str(tmp_path / "m.ckpt"))
    recorded = json.loads(meta["sdtrain_config"])
    assert recorded["data"]["subsets"][0]["path"] == "data" and recorded["train"]["output_dir"] == "run"
    assert recorded["data"]["cache_dir"] == "cache" and recorded["log"]["log_dir"] == "logs"
    assert meta["ss_sd_model_name"] == "m.ckpt" and recorded["model"]["path"] == "builtin:tiny-sdxl"
    assert not any(value.startswith("/") for value in string_values(recorded))
    assert not any(str(tmp_path) in value for value in meta.values())
    # everything else is kept
    assert recorded["network"]["rank"] == 4 and recorded["data"]["subsets"][0]["caption_dropout"] == 0.2

    relative = json.loads(build_metadata("sdxl", spec(), output_name="run", config=config,
                                         config_dir=tmp_path.parent)["sdtrain_config"])
    assert relative["data"]["subsets"][0]["path"] == f"{tmp_path.name}/data"


def test_trained_adapter_metadata_has_no_absolute_paths(tmp_path, capsys):
    """Through the trainer: a local base model folder, dataset, cache and output folders under tmp_path."""
    from helpers_training import write_config
    from sdtrain.cli import main
    from sdtrain.models.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("sdxl", tmp_path / "models" / "tiny-base")
    config = write_config(tmp_path, "run", steps=1, extra="[sample]\nevery_n_steps = 0")
    assert main(["train", config, "--quiet", "--set", f"model.path={model}"]) == 0
    with safe_open(str(tmp_path / "run" / "run.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_sd_model_name"] == "tiny-base"
    recorded = json.loads(meta["sdtrain_config"])
    assert recorded["model"]["path"] == "tiny-base" and recorded["data"]["subsets"][0]["path"] == "data"
    home = os.path.expanduser("~")
    local = [str(tmp_path)] + ([home + "/"] if home not in ("", "/") else [])
    assert not [(key, value) for key, value in meta.items() if any(path in value for path in local)]
