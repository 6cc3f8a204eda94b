"""Tiny, architecturally faithful SD1.5-like and SDXL-like pipelines, built offline in about a second.

They have the real module structure (so adapter names, key layouts and loaders behave as on real models) at a
fraction of the width: UNet2DConditionModel with cross-attention transformer blocks, ResNet blocks,
down/up-samplers and `layers_per_block=2`; SDXL's `text_time` added conditioning, linear projections and two
text encoders of different widths (CLIPTextModel + CLIPTextModelWithProjection); a four-level AutoencoderKL
(the real ×8 latent factor); the real SD1.5/SDXL scheduler settings and the real CLIP BPE tokenizer.

`model.path = "builtin:tiny-sd15"` / `"builtin:tiny-sdxl"` in a config trains against these.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.models.clip_tokenizer import build_clip_tokenizer

ARCHS = ("sd15", "sdxl")

# Noise schedule shared by SD1.5 and SDXL (from their released scheduler configs).
_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)

TE1_WIDTH = 32  # stands in for CLIP-L's 768
TE2_WIDTH = 64  # stands in for CLIP-G's 1280


def _text_encoder_config(width: int, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim or width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


SD15_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    norm_num_groups=16,
    cross_attention_dim=TE1_WIDTH,
    attention_head_dim=4,
)

_TIME_DIM = 8
SDXL_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    norm_num_groups=16,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=TE1_WIDTH + TE2_WIDTH,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=_TIME_DIM,
    projection_class_embeddings_input_dim=TE2_WIDTH + 6 * _TIME_DIM,
    upcast_attention=False,
)


def tiny_configs(arch: str):
    """(UNet config dict, [CLIPTextConfig, ...]) of a tiny model, for planning without weights."""
    if arch == "sd15":
        return dict(SD15_UNET), [_text_encoder_config(TE1_WIDTH, "quick_gelu")]
    if arch == "sdxl":
        return dict(SDXL_UNET), [_text_encoder_config(TE1_WIDTH, "quick_gelu"), _text_encoder_config(TE2_WIDTH, "gelu")]
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")


def _unet(config: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def build_tiny_pipeline(arch: str = "sd15", seed: int = 0):
    """A randomly initialised tiny pipeline (`StableDiffusionPipeline` or `StableDiffusionXLPipeline`)."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")
    torch.manual_seed(seed)
    if arch == "sd15":
        scheduler = PNDMScheduler(**_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
        pipe = StableDiffusionPipeline(
            vae=_vae(0.18215, force_upcast=False),
            text_encoder=CLIPTextModel(_text_encoder_config(TE1_WIDTH, "quick_gelu")),
            tokenizer=build_clip_tokenizer(),
            unet=_unet(SD15_UNET),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        scheduler = EulerDiscreteScheduler(
            **_SCHEDULE, interpolation_type="linear", timestep_spacing="leading", use_karras_sigmas=False
        )
        pipe = StableDiffusionXLPipeline(
            vae=_vae(0.13025, force_upcast=True),
            text_encoder=CLIPTextModel(_text_encoder_config(TE1_WIDTH, "quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(TE2_WIDTH, "gelu")),
            tokenizer=build_clip_tokenizer(),
            tokenizer_2=build_clip_tokenizer(pad_token="!"),
            unet=_unet(SDXL_UNET),
            scheduler=scheduler,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(arch: str, folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors weights)."""
    folder = Path(folder)
    build_tiny_pipeline(arch, seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder
