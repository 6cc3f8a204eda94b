"""Adapter file metadata: kohya `ss_*` keys, `modelspec.*` keys, the sshs hashes and the training config.

Every value is a string (safetensors metadata is `dict[str, str]`). What the UIs read:
- A1111 lists a file as SDXL only when `ss_base_model_version` starts with `sdxl_`; `ss_output_name` is
  the alias in `<lora:alias:w>`; `ss_tag_frequency` (JSON `{folder: {tag: count}}`) feeds its tag list;
  `sshs_model_hash` is taken verbatim as the file's hash.
- `sdtrain_target` / `sdtrain_dora_scale` record the export target and how `dora_scale` encodes the magnitude
  (`export/targets.py`); files without them hold the magnitude itself.
- `ss_network_alpha` records the training alpha. The file's per-module `alpha` tensors equal the rank
  and the training alpha/rank is folded into `lora_up` (exact in A1111 1.9 and 1.10 alike).
- `sdtrain_config` is the resolved training config as JSON. Adapters get shared, so its path keys and
  `ss_sd_model_name` hold no absolute local path (`shareable_path`): a path inside the config's folder is written
  relative to it when the folder is given (`config_dir`), any other local path as its final name only (kohya
  writes `ss_sd_model_name` so too); hub ids and `builtin:` names are kept.

Hashes (`sshs_model_hash`, `sshs_legacy_hash`), computed on the bytes actually written:
- `model_hash`: sha256 hex of the bytes after the 8-byte header length and the JSON header (the tensor
  section), as sd-webui-additional-networks / kohya define it; it does not depend on the metadata.
- `legacy_hash`: first 8 hex digits of sha256 of the file bytes [0x100000, 0x110000) (A1111's old
  `model_hash`, kohya's `addnet_hash_legacy`). A file shorter than 1 MiB hashes the empty string
  ("e3b0c442"). kohya computes it on a copy holding only the `ss_*` metadata; sdtrain computes it on the
  file as written, so it equals what A1111 computes from the file. When the JSON header reaches past
  1 MiB (huge tag lists) the window overlaps the header and the stored value cannot equal a recomputation.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import ntpath
import os
import posixpath
import re

BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd15": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
MODELSPEC_IMPL = {"sd15": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
NETWORK_MODULE = "lycoris.kohya"
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000

MODEL_HASH_KEY = "sshs_model_hash"
LEGACY_HASH_KEY = "sshs_legacy_hash"
CONFIG_KEY = "sdtrain_config"
FOLDING_KEY = "sdtrain_alpha_folded"
TARGET_KEY = "sdtrain_target"  # the export target the file was written for (`export/targets.py`)
RULE_KEY = "sdtrain_dora_scale"  # how dora_scale relates to the trained magnitude: "magnitude" | "comfyui-w0-norm"


def tensor_section_offset(data: bytes) -> int:
    """Where the tensor bytes start: 8 + the header length stored little-endian in the first 8 bytes."""
    return 8 + int.from_bytes(data[:8], "little")


def model_hash(data: bytes) -> str:
    """sshs_model_hash: sha256 hex of the tensor section (bytes after the length and JSON header)."""
    return hashlib.sha256(memoryview(data)[tensor_section_offset(data):]).hexdigest()


def legacy_hash(data: bytes) -> str:
    """sshs_legacy_hash: first 8 hex of sha256 of bytes [0x100000, 0x110000) of the file."""
    return hashlib.sha256(memoryview(data)[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]


def file_hashes(path) -> dict[str, str]:
    """Both sshs hashes recomputed from a file on disk."""
    with open(path, "rb") as f:
        data = f.read()
    return {MODEL_HASH_KEY: model_hash(data), LEGACY_HASH_KEY: legacy_hash(data)}


_WINDOWS_ABSOLUTE = re.compile(r"^([A-Za-z]:[\\/]|\\\\)")


def shareable_path(value: str, config_dir=None) -> str:
    """A string as written into shared metadata: an absolute local path (POSIX, Windows or `~`) becomes its path
    relative to `config_dir` when inside it, else its final name; other strings are returned unchanged."""
    if not isinstance(value, str):
        return value
    windows = bool(_WINDOWS_ABSOLUTE.match(value))
    if not (windows or value.startswith(("/", "~"))):
        return value
    flavour = ntpath if windows else posixpath
    if config_dir is not None and not windows and value.startswith("/"):
        folder = os.path.abspath(os.fspath(config_dir))
        path = posixpath.normpath(value)
        if posixpath.commonpath([path, folder]) == folder:
            return posixpath.relpath(path, folder)
    return flavour.basename(flavour.normpath(value).rstrip("/\\")) or "."


def shareable_config(config: dict, config_dir=None) -> dict:
    """A config dict (`config_to_dict`) with `shareable_path` applied to the values of its path keys (those the
    schema declares as paths: model.path, data.subsets[].path, train.output_dir, ...)."""
    import dataclasses

    from sdtrain.config.kinds import Path as PathKind, Section, SectionList
    from sdtrain.config.schema import Config

    def walk(table, cls):
        if not isinstance(table, dict):
            return table
        kinds = {f.name: f.metadata.get("kind") for f in dataclasses.fields(cls)}
        out = {}
        for key, value in table.items():
            kind = kinds.get(key)
            if isinstance(kind, PathKind):
                value = shareable_path(value, config_dir)
            elif isinstance(kind, Section):
                value = walk(value, kind.cls)
            elif isinstance(kind, SectionList) and isinstance(value, list):
                value = [walk(item, kind.cls) for item in value]
            out[key] = value
        return out

    return walk(config, Config)


def _spec_get(spec, name, default=None):
    if spec is None:
        return default
    if isinstance(spec, dict):
        return spec.get(name, default)
    return getattr(spec, name, default)


def network_args(spec) -> dict[str, str]:
    """`ss_network_args`: LyCORIS-style arguments with `dora_wd` and `wd_on_output` (strings, as kohya writes them)."""
    decompose = _spec_get(spec, "type", "dora") == "dora"
    axis = _spec_get(spec, "decompose_axis", "input")
    args = {
        "algo": "locon",
        "dora_wd": str(bool(decompose)),
        "wd_on_output": str(axis == "output"),
    }
    conv_rank = _spec_get(spec, "conv_rank")
    if conv_rank:
        args["conv_dim"] = str(conv_rank)
        args["conv_alpha"] = _number(_spec_get(spec, "conv_alpha", conv_rank))
    preset = _spec_get(spec, "preset")
    if preset:
        args["preset"] = str(preset)
    return args


def _number(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _resolution_pair(resolution) -> tuple[int, int] | None:
    if resolution is None or resolution == "auto":
        return None
    if isinstance(resolution, int):
        return resolution, resolution
    width, height = resolution
    return int(width), int(height)


def _timestamp(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    return float(value)


def build_metadata(
    arch: str,
    spec=None,
    *,
    output_name: str,
    tag_frequency: dict | None = None,
    resolution=None,
    num_train_images: int | None = None,
    steps: int | None = None,
    max_steps: int | None = None,
    epoch: int | None = None,
    started_at=None,
    finished_at=None,
    prediction_type: str = "epsilon",
    base_model_name: str | None = None,
    title: str | None = None,
    description: str | None = None,
    config: dict | None = None,
    config_dir=None,
    extra: dict | None = None,
) -> dict[str, str]:
    """The metadata written into an adapter file; every value is a string.

    `spec` is the network spec (object or dict with type, rank, alpha, conv_rank, conv_alpha,
    decompose_axis, preset); `started_at`/`finished_at` are datetimes or unix times; `config` is the
    resolved training config (stored as JSON); `extra` adds or overrides keys (written as given). The config's
    path keys and `base_model_name` hold no absolute local path: paths inside `config_dir` (the config file's
    folder) are written relative to it, other local paths as their final name (`shareable_path`).
    """
    if arch not in BASE_MODEL_VERSION:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(BASE_MODEL_VERSION)}")
    rank = _spec_get(spec, "rank")
    alpha = _spec_get(spec, "alpha", rank)
    meta: dict[str, str] = {
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_v2": str(arch == "sd2"),
        "ss_network_module": NETWORK_MODULE,
        "ss_network_args": json.dumps(network_args(spec)),
        "ss_output_name": output_name,
        "ss_tag_frequency": json.dumps(tag_frequency or {}),
        FOLDING_KEY: "True",
    }
    if rank is not None:
        meta["ss_network_dim"] = str(int(rank))
    if alpha is not None:
        meta["ss_network_alpha"] = _number(alpha)
    pair = _resolution_pair(resolution)
    if pair:
        meta["ss_resolution"] = f"({pair[0]}, {pair[1]})"
    for key, value in (("ss_num_train_images", num_train_images), ("ss_steps", steps),
                       ("ss_max_train_steps", max_steps), ("ss_epoch", epoch)):
        if value is not None:
            meta[key] = str(int(value))
    for key, value in (("ss_training_started_at", started_at), ("ss_training_finished_at", finished_at)):
        stamp = _timestamp(value)
        if stamp is not None:
            meta[key] = repr(stamp)
    if base_model_name:
        meta["ss_sd_model_name"] = shareable_path(str(base_model_name), config_dir)

    date = _dt.datetime.fromtimestamp(_timestamp(finished_at), _dt.timezone.utc) if finished_at is not None \
        else _dt.datetime.now(_dt.timezone.utc)
    v_prediction = prediction_type in ("v", "v_prediction")
    spec_arch = "stable-diffusion-v2-768-v" if arch == "sd2" and v_prediction else MODELSPEC_ARCH[arch]
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec_arch}/lora",
        "modelspec.implementation": MODELSPEC_IMPL[arch],
        "modelspec.title": title or output_name,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": date.replace(microsecond=0).isoformat(),
    })
    if pair:
        meta["modelspec.resolution"] = f"{pair[0]}x{pair[1]}"
    if description:
        meta["modelspec.description"] = description
    if config is not None:
        meta[CONFIG_KEY] = json.dumps(shareable_config(config, config_dir), sort_keys=True, default=str)
    if extra:
        meta.update({str(k): str(v) for k, v in extra.items()})
    return meta


def training_alpha(metadata: dict[str, str]) -> float | None:
    """The training alpha recorded in `ss_network_alpha`, or None."""
    value = metadata.get("ss_network_alpha")
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None


def parsed_network_args(metadata: dict[str, str]) -> dict:
    """`ss_network_args` as a dict ({} when missing or not JSON)."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}


def dora_scale_rule(metadata: dict[str, str]) -> str:
    """How the file's dora_scale encodes the magnitude ("magnitude" when the file does not say)."""
    return metadata.get(RULE_KEY) or "magnitude"
