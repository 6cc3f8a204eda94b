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
