"""Tiny, architecturally faithful SD1.5-like and SDXL-like pipelines, built offline in about a second.

They have the real module structure (so adapter names, key layouts and loaders behave as on real models) at a
fraction of the width: UNet2DConditionModel with cross-attention transformer blocks, ResNet blocks,
down/up-samplers and `layers_per_block=2`; SDXL's `text_time` added conditioning, linear projections and two
text encoders of different widths (CLIPTextModel + CLIPTextModelWithProjection); a four-level AutoencoderKL
(the real ×8 latent factor); the real SD1.5/SDXL scheduler settings and the real CLIP BPE tokenizer.

Built-in names (`model.path`):

- `builtin:tiny-sd15-random` / `builtin:tiny-sdxl-random`: `build_tiny_pipeline(arch, seed=0)`, random weights.
- `builtin:tiny-sd15` / `builtin:tiny-sdxl`: the same architecture with the weights that
  `scripts/pretrain_tiny.py` trained on a procedurally generated world of coloured shapes (package data
  `data/tiny-<arch>.safetensors`, checked against `data/tiny-models.json` when loaded). They draw circles,
  squares and triangles in eight colours on nine backgrounds at 64-128 pixels from captions such as
  "a small red triangle above a blue circle on a grey background".

The weight files are the random model plus what training changed: every tensor in fp16, except the text encoders'
token embeddings, of which only the rows of tokens that occur in the shapes world's captions are stored
(`<key>.trained_rows` with `<key>.trained_values`); the rows of every other token keep the random initialisation
of seed 0, as in the `-random` model. This keeps both files together under 20 MB.
"""

from __future__ import annotations

import hashlib
import json
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


# ---------------------------------------------------------------------------------------------------- pretrained

RANDOM_SUFFIX = "-random"
DATA_DIR = Path(__file__).resolve().parent / "data"
MANIFEST = DATA_DIR / "tiny-models.json"
COMPONENTS = {"sd15": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
ROWS, VALUES = ".trained_rows", ".trained_values"


def pretrained_file(arch: str) -> Path:
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")
    return DATA_DIR / f"tiny-{arch}.safetensors"


def _token_embedding_key(state: dict) -> str:
    (key,) = [k for k in state if k.endswith("token_embedding.weight")]
    return key


def weights_digest(pipe, arch: str) -> str:
    """sha256 of every weight of the pipeline's components (names, shapes, float32 bytes), in a fixed order."""
    h = hashlib.sha256()
    for component in COMPONENTS[arch]:
        state = getattr(pipe, component).state_dict()
        for key in sorted(state):
            tensor = state[key].detach().to("cpu", torch.float32).contiguous()
            h.update(f"{component}.{key}:{list(tensor.shape)}".encode())
            h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def pretrained_tensors(pipe, arch: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The weight-file form of a trained tiny pipeline (see the module docstring): `component.key` tensors in
    `dtype`; a token embedding as the rows that differ from the seed-0 random initialisation."""
    init = build_tiny_pipeline(arch, seed=0)
    tensors = {}
    for component in COMPONENTS[arch]:
        state = getattr(pipe, component).state_dict()
        embedding = _token_embedding_key(state) if component.startswith("text_encoder") else None
        for key, value in state.items():
            name = f"{component}.{key}"
            if key == embedding:
                start = getattr(init, component).state_dict()[key]
                rows = torch.nonzero((value.float() != start.float()).any(dim=1)).flatten()
                tensors[name + ROWS] = rows.to(torch.int32)
                tensors[name + VALUES] = value[rows].to(dtype).contiguous()
            else:
                tensors[name] = value.detach().to(dtype).contiguous()
    return tensors


def apply_pretrained_tensors(pipe, arch: str, tensors: dict[str, torch.Tensor]) -> None:
    """Load weight-file tensors (`pretrained_tensors`) into a pipeline built by `build_tiny_pipeline(arch, 0)`."""
    for component in COMPONENTS[arch]:
        module = getattr(pipe, component)
        state = module.state_dict()
        embedding = _token_embedding_key(state) if component.startswith("text_encoder") else None
        loaded = {}
        for key, current in state.items():
            name = f"{component}.{key}"
            if key == embedding:
                table = current.detach().clone()
                rows = tensors[name + ROWS].long()
                table[rows] = tensors[name + VALUES].to(table.dtype)
                loaded[key] = table
            else:
                loaded[key] = tensors[name].to(current.dtype)
        module.load_state_dict(loaded, strict=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest() -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def load_pretrained_tiny(arch: str):
    """The pretrained tiny pipeline of `arch`; the weight file must match the manifest's sha256."""
    from safetensors.torch import load_file

    from sdtrain.errors import ModelLoadError

    path = pretrained_file(arch)
    name = f"builtin:tiny-{arch}"
    if not path.is_file() or not MANIFEST.is_file():
        raise ModelLoadError(f"{name}: {path if not path.is_file() else MANIFEST} is missing from the installed "
                             f"package; reinstall sdtrain, or use builtin:tiny-{arch}{RANDOM_SUFFIX} (random weights)")
    expected = read_manifest()["models"][name]["sha256"]
    found = file_sha256(path)
    if found != expected:
        raise ModelLoadError(f"{name}: {path} has sha256 {found}, the manifest {MANIFEST} says {expected}; the "
                             "file is damaged or was replaced: reinstall sdtrain or rerun scripts/pretrain_tiny.py")
    pipe = build_tiny_pipeline(arch, seed=0)
    apply_pretrained_tensors(pipe, arch, load_file(str(path)))
    return pipe


def build_builtin(name: str, arch: str):
    """The pipeline of a `builtin:tiny-*` name: random weights for the `-random` names, else the pretrained ones."""
    if name.endswith(RANDOM_SUFFIX):
        return build_tiny_pipeline(arch, seed=0)
    return load_pretrained_tiny(arch)
