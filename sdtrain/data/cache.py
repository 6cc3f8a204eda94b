"""On-disk caches of VAE latents and text-encoder outputs (one safetensors file per entry).

Keys are sha256 digests, so a cache directory can be shared by runs, datasets and processes:
- latents: image content hash + bucket + flip + crop offset + VAE fingerprint + CACHE_FORMAT, and for an image
  with a loss mask the mask's source and content hash (`masks.MaskRef.cache_tag`); a changed image or mask has a
  new content hash, hence a new key, and is encoded again. A masked entry holds the latent-size mask
  (`masks.latent_mask`) next to the latent;
- text: caption text + text-encoder fingerprint + CACHE_FORMAT.
Entries are written to a temporary file and renamed into place, so a crash or two processes writing the same
entry never leave a half-written file. Each file stores its key in the safetensors metadata and is only
reused when that key matches. Stale entries (old images, old VAEs) are left on disk; delete the folder to
reclaim the space.

The caches do not know any model: the caller passes `encode_fn` (a batch of items or captions -> tensors).
To split work across processes, pass each process its share (`items[rank::world]`); `missing` and `load` work
on any subset.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdtrain.data.masks import MaskRef, latent_mask
from sdtrain.errors import DataError
from sdtrain.files import atomic_save_safetensors

CACHE_FORMAT = "sdtrain-cache-v1"  # bump when resize/crop/encoding rules change

Size = tuple[int, int]


@dataclass(frozen=True)
class LatentItem:
    """One latent-cache entry: an image file cut to `bucket` at `crop_top_left`, flipped or not, with its loss
    mask when it has one."""

    path: Path
    content_hash: str
    original_size: Size
    bucket: Size
    flip: bool
    crop_top_left: tuple[int, int]
    mask: MaskRef | None = None


def _clean_config(config) -> dict:
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in as_dict.items() if not k.startswith("_") and k != "transformers_version"}


def model_fingerprint(*modules: torch.nn.Module, extra: str = "") -> str:
    """Short digest of models' class, config and weights (every tensor's name, shape, dtype and sum, plus
    the raw bytes of the first, middle and last tensor). `extra` adds anything else that changes the
    output (e.g. encode dtype)."""
    digest = hashlib.sha256(extra.encode())
    for module in modules:
        digest.update(type(module).__name__.encode())
        config = getattr(module, "config", None)
        if config is not None:
            digest.update(json.dumps(_clean_config(config), sort_keys=True, default=str).encode())
        tensors = list(module.state_dict().items())
        with torch.no_grad():
            for name, tensor in tensors:
                total = tensor.detach().double().sum().item() if tensor.numel() else 0.0
                digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}".encode())
            for index in sorted({0, len(tensors) // 2, len(tensors) - 1}):
                if 0 <= index < len(tensors):
                    digest.update(tensors[index][1].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def vae_fingerprint(vae: torch.nn.Module, extra: str = "") -> str:
    """Fingerprint of a VAE for the latent cache key."""
    return model_fingerprint(vae, extra=extra)


def text_encoder_fingerprint(*encoders: torch.nn.Module, extra: str = "") -> str:
    """Fingerprint of one or more text encoders (pass the tokenizer's identity in `extra` if it varies)."""
    return model_fingerprint(*encoders, extra=extra)


class SafetensorsStore:
    """Folder of `<key[:2]>/<key>.safetensors` files, written atomically, each tagged with its key."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                return (handle.metadata() or {}).get("key") == key
        except Exception:  # unreadable header: treat as missing, it will be rewritten
            return False

    def read(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        try:
            return load_file(str(path))
        except FileNotFoundError as exc:
            raise DataError(f"cache entry {path} is missing; fill the cache before training") from exc
        except Exception as exc:
            raise DataError(f"cache entry {path} is unreadable ({exc}); delete it and run again") from exc

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                                self.path(key), metadata={"key": key, "format": CACHE_FORMAT})


def _digest(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _chunks(values: list, size: int):
    for start in range(0, len(values), size):
        yield values[start:start + size]


class LatentCache:
    """VAE latents per LatentItem. encode_fn(list of items sharing a bucket) -> Tensor (n, C, h, w)."""

    def __init__(self, cache_dir, vae_fingerprint: str):
        self.store = SafetensorsStore(cache_dir)
        self.vae_fingerprint = vae_fingerprint

    def key(self, item: LatentItem) -> str:
        (bw, bh), (top, left) = item.bucket, item.crop_top_left
        mask = () if item.mask is None else (f"mask={item.mask.cache_tag()}",)
        return _digest(CACHE_FORMAT, "latent", item.content_hash, f"{bw}x{bh}", f"flip={int(item.flip)}",
                       f"crop={top},{left}", self.vae_fingerprint, *mask)

    def missing(self, items: list[LatentItem]) -> list[LatentItem]:
        """Items without a valid entry (each key once, in input order)."""
        seen, missing = set(), []
        for item in items:
            key = self.key(item)
            if key not in seen and not self.store.has(key):
                missing.append(item)
            seen.add(key)
        return missing

    def ensure(self, items: list[LatentItem], encode_fn: Callable[[list[LatentItem]], torch.Tensor],
               batch_size: int = 8, progress: Callable[[int], None] | None = None) -> int:
        """Encode and store every missing item (grouped by bucket); returns how many were encoded."""
        by_bucket: dict[Size, list[LatentItem]] = defaultdict(list)
        for item in self.missing(items):
            by_bucket[item.bucket].append(item)
        encoded = 0
        for bucket in sorted(by_bucket):
            for chunk in _chunks(by_bucket[bucket], batch_size):
                latents = encode_fn(chunk)
                if len(latents) != len(chunk):
                    raise ValueError(f"encode_fn returned {len(latents)} latents for {len(chunk)} items")
                for item, latent in zip(chunk, latents):
                    entry = {"latents": latent}
                    if item.mask is not None:
                        entry["mask"] = latent_mask(item, latent.shape[-2:])
                    self.store.write(self.key(item), entry)
                encoded += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        return encoded

    def load(self, item: LatentItem) -> torch.Tensor:
        return self.store.read(self.key(item))["latents"]

    def load_with_mask(self, item: LatentItem) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents, the (1, h, w) loss mask or None) of one item."""
        entry = self.store.read(self.key(item))
        return entry["latents"], entry.get("mask")

    def get_or_encode(self, items: list[LatentItem], encode_fn, batch_size: int = 8) -> list[torch.Tensor]:
        """Latents for `items` (in order), encoding only the missing ones."""
        self.ensure(items, encode_fn, batch_size)
        return [self.load(item) for item in items]


class TextEncoderCache:
    """Text-encoder outputs per caption. encode_fn(list of captions) -> dict name -> Tensor (n, ...),
    e.g. SDXL {"hidden_states_1", "hidden_states_2", "pooled"}; entries come back as such dicts (no batch dim).
    """

    def __init__(self, cache_dir, encoder_fingerprint: str):
        self.store = SafetensorsStore(cache_dir)
        self.encoder_fingerprint = encoder_fingerprint

    def key(self, caption: str) -> str:
        return _digest(CACHE_FORMAT, "text", self.encoder_fingerprint, json.dumps(caption))

    def missing(self, captions: list[str]) -> list[str]:
        unique = list(dict.fromkeys(captions))
        return [caption for caption in unique if not self.store.has(self.key(caption))]

    def ensure(self, captions: list[str], encode_fn: Callable[[list[str]], dict[str, torch.Tensor]],
               batch_size: int = 16) -> int:
        encoded = 0
        for chunk in _chunks(self.missing(captions), batch_size):
            outputs = encode_fn(chunk)
            for name, tensor in outputs.items():
                if len(tensor) != len(chunk):
                    raise ValueError(f"encode_fn output {name!r} has {len(tensor)} rows for {len(chunk)} captions")
            for row, caption in enumerate(chunk):
                self.store.write(self.key(caption), {name: tensor[row].clone() for name, tensor in outputs.items()})
            encoded += len(chunk)
        return encoded

    def load(self, caption: str) -> dict[str, torch.Tensor]:
        return self.store.read(self.key(caption))

    def get_or_encode(self, captions: list[str], encode_fn, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
        self.ensure(captions, encode_fn, batch_size)
        return [self.load(caption) for caption in captions]
