"""load_base accepts every source type; weights are compared with the pipeline they were saved from."""

import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from sdtrain.errors import ModelLoadError
from sdtrain.models.loading import OFFLINE_SINGLE_FILE, load_base, load_base_state_dict, load_vae_file
from sdtrain.models.single_file import save_single_file
from sdtrain.models.tiny import build_tiny_pipeline


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ("sd15", "sdxl"):
        pipe = build_tiny_pipeline(arch, seed=0)
        pipe.save_pretrained(root / f"{arch}-diffusers", safe_serialization=True)
        save_single_file(pipe, arch, root / f"{arch}.safetensors")
        out[arch] = pipe
    return root, out


def assert_same_weights(base, pipe):
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    pairs = [(base.unet, pipe.unet), (base.vae, pipe.vae)] + list(zip(base.text_encoders, encoders))
    assert len(base.text_encoders) == len(encoders)
    for loaded, original in pairs:
        a, b = loaded.state_dict(), original.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def builtins():
    return {arch: load_base(f"builtin:tiny-{arch}-random") for arch in ("sd15", "sdxl")}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_builtin(arch, files, builtins):
    base = builtins[arch]
    assert base.arch == arch and base.source == f"builtin:tiny-{arch}-random"
    assert len(base.text_encoders) == len(base.tokenizers) == (1 if arch == "sd15" else 2)
    assert isinstance(base.noise_scheduler, DDPMScheduler)
    cfg = base.noise_scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type) == (1000, "scaled_linear", "epsilon")
    assert (cfg.beta_start, cfg.beta_end, cfg.clip_sample) == (0.00085, 0.012, False)
    assert base.prediction_type == "epsilon" and base.fingerprint.startswith(arch + "-")
    assert_same_weights(base, files[1][arch])  # built with the fixed seed 0


def test_unknown_builtin():
    with pytest.raises(ModelLoadError, match="builtin:tiny-sd15"):
        load_base("builtin:tiny-sd3")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_folder(arch, files, builtins):
    root, pipes = files
    base = load_base(root / f"{arch}-diffusers")
    assert base.arch == arch and "diffusers folder" in base.source
    assert_same_weights(base, pipes[arch])
    assert base.tokenizers[-1].pad_token == ("!" if arch == "sdxl" else "<|endoftext|>")
    # The fingerprint follows the weights, not the path: same model as the builtin, wherever it lives.
    assert base.fingerprint == builtins[arch].fingerprint


def test_prediction_type_override_on_moved_folder(files, builtins, tmp_path):
    root, _ = files
    moved = shutil.copytree(root / "sd15-diffusers", tmp_path / "moved")
    v = load_base(moved, prediction_type="v_prediction")
    assert v.prediction_type == "v_prediction" and v.noise_scheduler.config.prediction_type == "v_prediction"
    assert v.scheduler_config["prediction_type"] == "v_prediction"
    assert v.fingerprint != builtins["sd15"].fingerprint
    assert v.fingerprint.startswith("sd15-")


def test_arch_mismatch_is_reported(files):
    root, _ = files
    with pytest.raises(ModelLoadError, match="sdxl"):
        load_base(root / "sdxl-diffusers", arch="sd15")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_with_config_dir(arch, files):
    root, pipes = files
    base = load_base(root / f"{arch}.safetensors", config_dir=root / f"{arch}-diffusers")
    assert base.arch == arch and "single file" in base.source
    assert_same_weights(base, pipes[arch])
    assert base.scheduler_config["prediction_type"] == "epsilon"


def test_single_file_without_config_offline(files):
    root, _ = files
    with pytest.raises(ModelLoadError) as info:
        load_base(root / "sdxl.safetensors")
    assert OFFLINE_SINGLE_FILE in str(info.value)
    assert "offline single-file loading needs model.config_dir = a local diffusers folder of the same architecture" in str(info.value)


def test_single_file_with_config_of_other_arch(files):
    root, _ = files
    with pytest.raises(ModelLoadError, match="same architecture"):
        load_base(root / "sdxl.safetensors", config_dir=root / "sd15-diffusers")


def test_pickle_refused_then_allowed(files, tmp_path):
    root, pipes = files
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_base_state_dict(root / "sd15.safetensors")}, ckpt)
    with pytest.raises(ModelLoadError, match="model.allow_pickle"):
        load_base(ckpt, config_dir=root / "sd15-diffusers")
    base = load_base(ckpt, config_dir=root / "sd15-diffusers", allow_pickle=True)
    assert_same_weights(base, pipes["sd15"])


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model.safetensors"
    with pytest.raises(ModelLoadError, match="no-such-model.safetensors"):
        load_base(missing)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_base(tmp_path)


def test_hub_id_offline_not_cached():
    with pytest.raises(ModelLoadError, match="offline"):
        load_base("sdtrain-tests/definitely-not-cached")


def test_bad_prediction_type():
    from sdtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="model.prediction_type"):
        load_base("builtin:tiny-sd15", prediction_type="sample")


def test_vae_override_folder_and_files(files, builtins, tmp_path):
    other = build_tiny_pipeline("sd15", seed=3)
    other.vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    save_single_file(other, "sd15", tmp_path / "full.safetensors")
    ldm_vae = {k: v for k, v in load_base_state_dict(tmp_path / "full.safetensors").items()
               if k.startswith("first_stage_model.")}
    save_file(ldm_vae, tmp_path / "vae-ldm.safetensors")
    save_file({k: v.contiguous() for k, v in other.vae.state_dict().items()}, tmp_path / "vae-diffusers.safetensors")
    expected = other.vae.state_dict()

    def check(vae):
        got = vae.state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)

    base = load_base("builtin:tiny-sd15", vae=tmp_path / "vae")
    check(base.vae)
    assert str(tmp_path / "vae") in base.source and base.fingerprint != builtins["sd15"].fingerprint
    base_config = builtins["sd15"].vae.config
    check(load_vae_file(tmp_path / "vae-ldm.safetensors", base_config))
    check(load_vae_file(tmp_path / "vae-diffusers.safetensors", base_config))
    check(load_vae_file(tmp_path / "full.safetensors", base_config))  # a whole checkpoint's VAE
    with pytest.raises(ModelLoadError, match="model.vae"):
        load_vae_file(tmp_path / "vae-ldm.safetensors", builtins["sdxl"].vae.config | {"block_out_channels": [8, 8, 8, 8]})
    with pytest.raises(ModelLoadError, match="model.vae"):
        load_base("builtin:tiny-sd15", vae=tmp_path / "missing-vae.safetensors")


def test_dtype(builtins):
    base = load_base("builtin:tiny-sd15-random", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for m in (base.unet, base.vae, *base.text_encoders) for p in m.parameters())
    assert base.fingerprint == builtins["sd15"].fingerprint  # fp16 copy of the same model


def test_load_base_state_dict_is_single_file_layout(files):
    root, _ = files
    from_folder = load_base_state_dict(root / "sd15-diffusers")
    from_file = load_base_state_dict(root / "sd15.safetensors")
    assert set(from_folder) == set(from_file)
    assert all(torch.equal(from_folder[k], from_file[k]) for k in from_file)
