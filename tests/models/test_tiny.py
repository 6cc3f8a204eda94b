"""The tiny pipelines keep the structure and settings of the released SD1.5 / SDXL models."""

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdtrain.models.tiny import build_tiny_pipeline

# Values of the released scheduler configs (runwayml SD1.5 PNDM, SDXL base 1.0 Euler).
REAL_SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon",
)
REAL_SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, prediction_type="epsilon", interpolation_type="linear", timestep_spacing="leading",
    use_karras_sigmas=False,
)


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_pipeline("sd15", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_pipeline("sdxl", seed=0)


def test_sd15_structure(sd15):
    cfg = sd15.unet.config
    assert cfg.layers_per_block == 2
    assert list(cfg.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(cfg.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert type(sd15.text_encoder) is CLIPTextModel
    assert sd15.text_encoder.config.hidden_act == "quick_gelu"
    assert cfg.cross_attention_dim == sd15.text_encoder.config.hidden_size
    assert cfg.addition_embed_type is None


def test_sdxl_structure(sdxl):
    cfg = sdxl.unet.config
    te1, te2 = sdxl.text_encoder, sdxl.text_encoder_2
    assert cfg.layers_per_block == 2
    assert list(cfg.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(cfg.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert cfg.addition_embed_type == "text_time" and cfg.use_linear_projection
    assert len(set(cfg.transformer_layers_per_block)) > 1  # SDXL varies depth per level (1/2/10)
    assert type(te1) is CLIPTextModel and type(te2) is CLIPTextModelWithProjection
    assert te1.config.hidden_size != te2.config.hidden_size
    assert cfg.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    # SDXL: pooled text embedding + 6 size/crop conditioning values, each embedded (real: 1280 + 6 * 256 = 2816).
    assert cfg.projection_class_embeddings_input_dim == te2.config.projection_dim + 6 * cfg.addition_time_embed_dim
    assert sdxl.tokenizer_2.pad_token == "!"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_vae_four_levels_factor_eight(arch, sd15, sdxl):
    pipe = sd15 if arch == "sd15" else sdxl
    vae = pipe.vae
    assert len(vae.config.down_block_types) == 4 and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == (0.18215 if arch == "sd15" else 0.13025)
    assert vae.config.force_upcast == (arch == "sdxl")
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        images = vae.decode(latents).sample
    assert latents.shape == (1, 4, 4, 4) and images.shape == (1, 3, 32, 32)


def test_scheduler_configs_equal_released_values(sd15, sdxl):
    assert type(sd15.scheduler).__name__ == "PNDMScheduler"
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    for pipe, expected in ((sd15, REAL_SD15_SCHEDULER), (sdxl, REAL_SDXL_SCHEDULER)):
        assert {k: pipe.scheduler.config[k] for k in expected} == expected


def test_unet_forward(sd15, sdxl):
    torch.manual_seed(0)
    with torch.no_grad():
        ids = sd15.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = sd15.text_encoder(ids).last_hidden_state
        out = sd15.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=hidden).sample
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()

        h1 = sdxl.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        o2 = sdxl.text_encoder_2(ids, output_hidden_states=True)
        hidden = torch.cat([h1, o2.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        out = sdxl.unet(
            torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=hidden,
            added_cond_kwargs={"text_embeds": o2.text_embeds, "time_ids": time_ids},
        ).sample
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_pipeline_generates(sdxl):
    image = sdxl("a cat", num_inference_steps=1, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


def sdxl_seed0_conv_in():
    return build_tiny_pipeline("sdxl", seed=0).unet.conv_in.weight


def test_seed_determines_weights():
    a, b = (build_tiny_pipeline("sdxl", seed=s).unet.conv_in.weight for s in (0, 1))
    assert torch.equal(a, sdxl_seed0_conv_in()) and not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- builtin names

from sdtrain.config.schema import BUILTIN_MODELS  # noqa: E402
from sdtrain.models import tiny  # noqa: E402


def test_builtin_names_cover_pretrained_and_random():
    assert BUILTIN_MODELS == {"builtin:tiny-sd15": "sd15", "builtin:tiny-sdxl": "sdxl",
                              "builtin:tiny-sd15-random": "sd15", "builtin:tiny-sdxl-random": "sdxl"}


def test_random_names_build_the_seed0_random_model(sdxl):
    random_pipe = tiny.build_builtin("builtin:tiny-sdxl-random", "sdxl")
    assert tiny.weights_digest(random_pipe, "sdxl") == tiny.weights_digest(sdxl, "sdxl")


@pytest.fixture(scope="module")
def manifest():
    return tiny.read_manifest()


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_published_weights_load_and_match_the_manifest(arch, manifest):
    entry = manifest["models"][f"builtin:tiny-{arch}"]
    path = tiny.pretrained_file(arch)
    assert path.name == entry["file"] and path.stat().st_size == entry["bytes"]
    assert tiny.file_sha256(path) == entry["sha256"]
    pipe = tiny.build_builtin(f"builtin:tiny-{arch}", arch)
    assert tiny.weights_digest(pipe, arch) == entry["weights_sha256"]  # the file, applied on the seed-0 model
    random_pipe = tiny.build_tiny_pipeline(arch, seed=0)
    assert not torch.equal(pipe.unet.conv_in.weight, random_pipe.unet.conv_in.weight)
    # Same architecture and configs as the random model: only the weights differ.
    assert dict(pipe.unet.config) == dict(random_pipe.unet.config)
    assert dict(pipe.vae.config) == dict(random_pipe.vae.config)


def test_published_files_are_small_with_licence_and_command(manifest):
    sizes = [tiny.pretrained_file(arch).stat().st_size for arch in ("sd15", "sdxl")]
    assert sum(sizes) <= 20_000_000
    assert "Apache-2.0" in manifest["licence"] and manifest["command"].startswith("python3 scripts/pretrain_tiny.py")


def test_untrained_token_rows_keep_the_random_initialisation():
    pipe = tiny.load_pretrained_tiny("sd15")
    random_pipe = tiny.build_tiny_pipeline("sd15", seed=0)
    table = pipe.text_encoder.get_input_embeddings().weight
    start = random_pipe.text_encoder.get_input_embeddings().weight
    tokenizer = pipe.tokenizer
    red, star = (tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("red", "star"))
    assert not torch.equal(table[red], start[red])  # a word of the shapes world: trained
    assert torch.equal(table[star], start[star])  # the demo's new word: never seen in pretraining


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_weight_file_form_round_trips(arch):
    """A trained pipeline (here: seed-1 weights with the seed-0 token tables and two changed rows) survives the
    file form exactly in float32, and only the changed token rows are stored."""
    pipe, start = tiny.build_tiny_pipeline(arch, seed=1), tiny.build_tiny_pipeline(arch, seed=0)
    names = ["text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    with torch.no_grad():
        for name in names:
            table = getattr(pipe, name).get_input_embeddings().weight
            table.copy_(getattr(start, name).get_input_embeddings().weight)
            table[[5, 320]] += 1.0
    tensors = tiny.pretrained_tensors(pipe, arch, dtype=torch.float32)
    rows = {k: v.tolist() for k, v in tensors.items() if k.endswith(tiny.ROWS)}
    assert len(rows) == len(names) and all(r == [5, 320] for r in rows.values())
    fresh = tiny.build_tiny_pipeline(arch, seed=0)
    tiny.apply_pretrained_tensors(fresh, arch, tensors)
    assert tiny.weights_digest(fresh, arch) == tiny.weights_digest(pipe, arch)


def test_damaged_weight_file_is_refused(tmp_path, monkeypatch):
    import shutil

    from sdtrain.errors import ModelLoadError

    for name in ("tiny-sd15.safetensors", "tiny-models.json"):
        shutil.copy(tiny.DATA_DIR / name, tmp_path / name)
    data = bytearray((tmp_path / "tiny-sd15.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "tiny-sd15.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(tiny, "DATA_DIR", tmp_path)
    monkeypatch.setattr(tiny, "MANIFEST", tmp_path / "tiny-models.json")
    with pytest.raises(ModelLoadError, match="damaged"):
        tiny.load_pretrained_tiny("sd15")
