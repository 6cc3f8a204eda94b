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
