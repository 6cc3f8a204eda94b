"""Load a base model (SD1.x, SD2.x, SDXL) from any supported source into one `BaseModel`.

Sources (`model.path`): `builtin:tiny-sd15` / `builtin:tiny-sdxl` (pretrained) and their `-random` twins; a diffusers folder (`model_index.json`);
a single-file `.safetensors` (architecture detected from its keys; diffusers' `from_single_file` builds the
components, with `model.config_dir` giving the configs and tokenizers offline); a hub id `org/name`
(downloaded when online, taken from the local cache when offline; `model.revision` picks its branch, tag or
commit, `model.variant` its weight variant such as fp16); `.ckpt`/`.pt` only with
`model.allow_pickle = true`. `model.vae` swaps in another VAE (diffusers folder, hub id or single `.safetensors`
in either layout) and `model.prediction_type` overrides the scheduler's (e.g. `v_prediction` for SD2-768-v).

Text-encoding notes for the training loop (not done here): SD1.x "clip_skip = 2" takes the text encoder's
`hidden_states[-2]` and applies `final_layer_norm`; SDXL always uses `hidden_states[-2]` of both encoders
(no final norm), concatenated on the feature axis, plus `text_embeds` (pooled, projected) of encoder 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdtrain.config.schema import BUILTIN_MODELS
from sdtrain.errors import ConfigError, ModelLoadError
from sdtrain.models.ldm_layout import (
    VAE_PREFIX,
    components_to_single_file_state_dict,
    is_vae_attention_projection,
    vae_to_ldm_key,
)
from sdtrain.models.single_file import (
    PICKLE_SUFFIXES,
    detect_single_file_arch,
    load_pickle_state_dict,
    read_state_dict_keys,
)

ARCHS = ("sd15", "sd2", "sdxl")
BUILTINS = BUILTIN_MODELS  # builtin:tiny-* name -> arch (defined with the config schema)
PREDICTION_TYPES = ("epsilon", "v_prediction")
OFFLINE_SINGLE_FILE = (
    "offline single-file loading needs model.config_dir = a local diffusers folder of the same architecture "
    "(e.g. a saved SDXL base)"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PIPELINE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion model that training needs."""

    arch: str  # "sd15" | "sd2" | "sdxl"
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any  # DDPMScheduler with the model's schedule and prediction type
    prediction_type: str
    source: str  # human-readable description of where the weights came from
    fingerprint: str  # "<arch>-<hex>": config + sampled weight bytes; same model → same string
    scheduler_config: dict = field(default_factory=dict)  # the model's own (sampling) scheduler config

    def single_file_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """This model in the single-file (LDM/SGM) layout."""
        return components_to_single_file_state_dict(
            self.arch, self.unet, self.vae, self.text_encoders, self.scheduler_config, dtype=dtype
        )


# ---------------------------------------------------------------------------------------------------- helpers

def is_offline(local_files_only: bool | None = None) -> bool:
    """True when nothing may be fetched from the hub (explicit flag, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    if local_files_only is not None:
        return bool(local_files_only)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and not text.endswith((".safetensors",) + PICKLE_SUFFIXES)


def _missing(path: str, key: str = "model.path") -> ModelLoadError:
    return ModelLoadError(
        f"{key}: {path} does not exist (resolved to {Path(path).expanduser().resolve()}); point it at a diffusers "
        "folder, a .safetensors checkpoint, a hub id (org/name) or builtin:tiny-sd15 / builtin:tiny-sdxl"
    )


def _check_arch(requested: str, found: str, where: str) -> str:
    if requested != "auto" and requested != found:
        raise ModelLoadError(f"model.arch = {requested!r} but {where} is {found}; set model.arch = \"{found}\" or auto")
    return found


def _weights_variant(subdir: Path) -> str | None:
    """"fp16" when a component folder only has fp16-variant weights (common in hub snapshots)."""
    names = [p.name for p in subdir.glob("*.safetensors")] + [p.name for p in subdir.glob("*.bin")]
    if any(".fp16." not in n for n in names):
        return None
    return "fp16" if names else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} is missing or not valid JSON ({exc}); is {path.parent} a complete diffusers folder?"
        ) from exc


def folder_arch(folder: Path) -> str:
    """The family of a diffusers folder, from its JSON configs alone (no weights are read)."""
    index = _read_json(folder / "model_index.json")
    components = {k for k, v in index.items() if isinstance(v, list) and v and v[0]}
    if {"unet", "vae", "text_encoder", "text_encoder_2"} <= components:
        return "sdxl"
    if {"unet", "vae", "text_encoder"} <= components:
        unet_cfg = _read_json(folder / "unet" / "config.json")
        te_cfg = _read_json(folder / "text_encoder" / "config.json")
        if unet_cfg.get("cross_attention_dim") == 1024 or te_cfg.get("hidden_act") == "gelu":
            return "sd2"
        return "sd15"
    raise ModelLoadError(
        f"{folder} is a {index.get('_class_name', 'diffusers')} folder without the unet/vae/text_encoder "
        "components of an SD1.x/SD2.x/SDXL text-to-image model"
    )


# ---------------------------------------------------------------------------------------------------- sources

def _parts_from_pipeline(pipe) -> dict:
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
    return dict(
        unet=pipe.unet, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
        scheduler_config=dict(pipe.scheduler.config),
    )


def _load_builtin(name: str) -> tuple[str, dict]:
    from sdtrain.models.tiny import build_builtin

    if name not in BUILTINS:
        raise ModelLoadError(f"model.path = {name!r} is not a built-in model; accepted: {', '.join(BUILTINS)}")
    arch = BUILTINS[name]
    return arch, _parts_from_pipeline(build_builtin(name, arch))


def _load_folder(folder: Path, arch: str, dtype: torch.dtype, variant: str | None = None) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    requested = variant

    def model(cls, sub, **kw):
        variant = requested or _weights_variant(folder / sub)
        try:
            return cls.from_pretrained(str(folder), subfolder=sub, local_files_only=True, variant=variant, **kw)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"could not load {sub} from diffusers folder {folder}: {exc}") from exc

    encoder_classes = [(CLIPTextModel, "text_encoder")]
    if arch == "sdxl":
        encoder_classes.append((CLIPTextModelWithProjection, "text_encoder_2"))
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(str(folder), subfolder=sub.replace("text_encoder", "tokenizer"))
                      for _, sub in encoder_classes]
        scheduler_config = json.loads(scheduler_file.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not read the tokenizer/scheduler of diffusers folder {folder}: {exc}") from exc
    return dict(
        unet=model(UNet2DConditionModel, "unet", torch_dtype=dtype),
        vae=model(AutoencoderKL, "vae", torch_dtype=dtype),
        text_encoders=[model(cls, sub, dtype=dtype) for cls, sub in encoder_classes],
        tokenizers=tokenizers,
        scheduler_config=scheduler_config,
    )


def _load_hub(repo_id: str, arch: str, offline: bool, dtype: torch.dtype, revision: str | None = None,
              variant: str | None = None) -> tuple[str, dict, Path]:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.txt"]
    if variant:  # e.g. unet/diffusion_pytorch_model.fp16.safetensors
        patterns += [f"{sub}/*.{variant}*.safetensors" for sub in ("unet", "vae", "text_encoder*")]
    else:
        patterns += [
            "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model-*.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder*/model.safetensors", "text_encoder*/model-*.safetensors",
        ]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                        local_files_only=offline))
    except Exception as exc:  # noqa: BLE001
        how = "is not in the local Hugging Face cache and the hub is offline" if offline else "could not be downloaded"
        raise ModelLoadError(
            f"model.path = {repo_id!r}: no such local file or folder, and as a hub id it {how} ({exc}); "
            "download it while online or point model.path at a local diffusers folder or .safetensors file"
        ) from exc
    found = _check_arch(arch, folder_arch(folder), f"hub model {repo_id}")
    return found, _load_folder(folder, found, dtype, variant), folder


def _load_single_file(path: Path, arch: str, config_dir, allow_pickle: bool, dtype, offline: bool) -> tuple[str, dict]:
    import diffusers

    keys = read_state_dict_keys(path, allow_pickle=allow_pickle)
    try:
        detected = detect_single_file_arch(keys)
    except ModelLoadError:
        if arch == "auto":
            raise
        detected = arch
    arch = _check_arch(arch, detected, f"checkpoint {path}")
    if config_dir is None and offline:
        raise ModelLoadError(f"cannot load {path} ({arch}): {OFFLINE_SINGLE_FILE}")
    kwargs: dict[str, Any] = dict(local_files_only=offline, torch_dtype=dtype)
    if config_dir is not None:
        config_dir = Path(config_dir).expanduser()
        if not (config_dir / "model_index.json").is_file():
            raise ModelLoadError(
                f"model.config_dir = {config_dir} is not a diffusers folder (no model_index.json); "
                + OFFLINE_SINGLE_FILE
            )
        config_arch = folder_arch(config_dir)
        if config_arch != arch:
            raise ModelLoadError(
                f"model.config_dir = {config_dir} holds a {config_arch} model but {path} is {arch}; "
                "use a diffusers folder of the same architecture"
            )
        kwargs["config"] = str(config_dir)
    cls = getattr(diffusers, _PIPELINE_CLASSES[arch])
    if arch != "sdxl":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        if config_dir is None:
            raise ModelLoadError(
                f"cannot load {path} ({arch}): fetching its configs from the hub failed ({exc}); {OFFLINE_SINGLE_FILE}"
            ) from exc
        raise ModelLoadError(f"diffusers could not load {path} with configs from {config_dir}: {exc}") from exc
    return arch, _parts_from_pipeline(pipe)


# ---------------------------------------------------------------------------------------------------- VAE override

def _vae_state_dict_from_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return load_pickle_state_dict(path, allow_pickle)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"model.vae: {path} is not a readable .safetensors file: {exc}") from exc


def load_vae_file(path: str | os.PathLike, vae_config, allow_pickle: bool = False):
    """AutoencoderKL with `vae_config` and the weights of a single VAE file (diffusers or LDM layout)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    state = _vae_state_dict_from_file(path, allow_pickle)
    vae = AutoencoderKL.from_config(dict(vae_config))
    target = vae.state_dict()
    if any(k.startswith("encoder.down_blocks.") for k in state):
        source = {k: k for k in target}
    else:
        prefix = next((p for p in (VAE_PREFIX, "vae.", "") if any(k.startswith(p + "encoder.") for k in state)), "")
        source = {k: prefix + vae_to_ldm_key(k, vae.config) for k in target}
    missing = [source[k] for k in target if source[k] not in state]
    if missing:
        raise ModelLoadError(
            f"model.vae: {path} is not an AutoencoderKL of this model's shape; missing {len(missing)} tensors "
            f"(e.g. {', '.join(missing[:3])})"
        )
    loaded = {}
    for key, value in target.items():
        tensor = state[source[key]]
        if tensor.shape != value.shape:
            if is_vae_attention_projection(source[key]) and tensor.numel() == value.numel():
                tensor = tensor.reshape(value.shape)
            else:
                raise ModelLoadError(
                    f"model.vae: {path} tensor {source[key]} has shape {tuple(tensor.shape)}, "
                    f"this model needs {tuple(value.shape)}"
                )
        loaded[key] = tensor
    vae.load_state_dict(loaded)
    return vae


def _load_vae(spec, base_vae_config, allow_pickle: bool, offline: bool):
    from diffusers import AutoencoderKL

    text = str(spec)
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            if (path / "config.json").is_file():
                return AutoencoderKL.from_pretrained(str(path), local_files_only=True), f"VAE folder {path}"
            if (path / "vae" / "config.json").is_file():
                vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", local_files_only=True)
                return vae, f"VAE of {path}"
            raise ModelLoadError(f"model.vae: {path} has neither config.json nor vae/config.json")
        if path.is_file():
            return load_vae_file(path, base_vae_config, allow_pickle), f"VAE file {path}"
        if _looks_like_hub_id(text):
            return AutoencoderKL.from_pretrained(text, local_files_only=offline), f"VAE {text} (hub)"
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"model.vae: could not load {text}: {exc}") from exc
    raise _missing(text, "model.vae")


# ---------------------------------------------------------------------------------------------------- fingerprint

def _sampled_bytes(module, h) -> None:
    state = module.state_dict()
    names = list(state)
    h.update(json.dumps([[n, list(state[n].shape)] for n in names]).encode())
    picks = dict.fromkeys([names[0], names[len(names) // 3], names[(2 * len(names)) // 3], names[-1]])
    for name in picks:  # ordered: the hash must not depend on set iteration order
        tensor = state[name].detach().flatten()[:1024].to("cpu", torch.float16)
        h.update(name.encode() + tensor.numpy().tobytes())


def model_fingerprint(arch: str, prediction_type: str, unet, vae, text_encoders) -> str:
    """`<arch>-<16 hex>` from the tensor names/shapes and a few sampled weights of every component.

    Independent of where the files live and of fp32/fp16 loading; changes with the weights, the VAE and the
    prediction type.
    """
    h = hashlib.sha256(f"{arch}|{prediction_type}|{vae.config.get('scaling_factor')}".encode())
    for module in (unet, vae, *text_encoders):
        _sampled_bytes(module, h)
    return f"{arch}-{h.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------------- entry points

def load_base(
    path: str | os.PathLike,
    *,
    arch: str = "auto",
    vae: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    prediction_type: str = "auto",
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> BaseModel:
    """Load the base model at `path` (see the module docstring for accepted sources).

    `revision` (branch, tag or commit) applies to a hub id; `variant` (e.g. "fp16") picks the weight files
    `*.{variant}.safetensors` of a hub model or diffusers folder (a folder holding only such files is read
    without being told)."""
    from diffusers import DDPMScheduler

    if prediction_type not in ("auto",) + PREDICTION_TYPES:
        raise ConfigError(f"model.prediction_type = {prediction_type!r} is not one of auto, epsilon, v_prediction")
    if arch not in ("auto",) + ARCHS:
        raise ConfigError(f"model.arch = {arch!r} is not one of auto, sd15, sd2, sdxl")
    offline = is_offline(local_files_only)
    vae = vae or None  # "" from a config means "not set"
    config_dir = config_dir or None
    text = str(path)
    fs_path = Path(text).expanduser()
    if text.startswith("builtin:"):
        found, parts = _load_builtin(text)
        found = _check_arch(arch, found, text)
        source = text
    elif fs_path.is_dir():
        if not (fs_path / "model_index.json").is_file():
            raise ModelLoadError(
                f"model.path: {fs_path} is a folder without model_index.json; point it at a diffusers pipeline "
                "folder (saved with save_pretrained) or a .safetensors checkpoint"
            )
        found = _check_arch(arch, folder_arch(fs_path), f"folder {fs_path}")
        parts = _load_folder(fs_path, found, dtype, variant)
        source = f"diffusers folder {fs_path.resolve()}"
    elif fs_path.is_file():
        suffix = fs_path.suffix.lower()
        if suffix not in (".safetensors",) + PICKLE_SUFFIXES:
            raise ModelLoadError(f"model.path: {fs_path} is not a .safetensors checkpoint or diffusers folder")
        found, parts = _load_single_file(fs_path, arch, config_dir, allow_pickle, dtype, offline)
        source = f"single file {fs_path.resolve()}" + (f" (configs from {config_dir})" if config_dir else "")
    elif _looks_like_hub_id(text):
        found, parts, folder = _load_hub(text, arch, offline, dtype, revision, variant)
        source = f"hub {text} ({folder})"
    else:
        raise _missing(text)

    if vae is not None:
        parts["vae"], vae_source = _load_vae(vae, parts["vae"].config, allow_pickle, offline)
        source += f" + {vae_source}"

    scheduler_config = dict(parts["scheduler_config"])
    if prediction_type == "auto":
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
    scheduler_config["prediction_type"] = prediction_type
    noise_scheduler = DDPMScheduler.from_config(
        scheduler_config, prediction_type=prediction_type, clip_sample=scheduler_config.get("clip_sample", False)
    )

    unet, vae_model, encoders = parts["unet"], parts["vae"], parts["text_encoders"]
    for module in (unet, vae_model, *encoders):
        if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
            module.to(dtype=dtype)
        module.eval()
    return BaseModel(
        arch=found,
        unet=unet,
        vae=vae_model,
        text_encoders=list(encoders),
        tokenizers=list(parts["tokenizers"]),
        noise_scheduler=noise_scheduler,
        prediction_type=prediction_type,
        source=source,
        fingerprint=model_fingerprint(found, prediction_type, unet, vae_model, encoders),
        scheduler_config=scheduler_config,
    )


def load_base_state_dict(
    path: str | os.PathLike, *, allow_pickle: bool = False, **load_kwargs
) -> dict[str, torch.Tensor]:
    """Base model weights in the single-file (LDM/SGM) layout, whatever the source.

    A single file is read as is; folders, hub ids and built-ins are loaded and converted.
    """
    fs_path = Path(str(path)).expanduser()
    if fs_path.is_file():
        if fs_path.suffix.lower() in PICKLE_SUFFIXES:
            return load_pickle_state_dict(fs_path, allow_pickle)
        from safetensors.torch import load_file

        return load_file(str(fs_path))
    return load_base(path, allow_pickle=allow_pickle, **load_kwargs).single_file_state_dict()


__all__ = [
    "ARCHS",
    "BUILTINS",
    "BaseModel",
    "OFFLINE_SINGLE_FILE",
    "is_offline",
    "load_base",
    "load_base_state_dict",
    "load_vae_file",
    "model_fingerprint",
]
