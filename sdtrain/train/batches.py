"""Turning planned batches into training tensors: latents, captions and SDXL size/crop conditioning.

Per-sample randomness (flip, caption augmentation) comes from `sample_rng(seed, key)`, seeded by the
sample's place in the plan, so a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtrain.data.buckets import sdxl_time_ids
from sdtrain.data.captions import augment_caption
from sdtrain.data.dataset import ScannedDataset, SampleKey, latent_item, latent_pixels, sample_rng


@dataclass
class Batch:
    latents: torch.Tensor  # [b, 4, h/8, w/8], already multiplied by the VAE scaling factor
    captions: list[str]
    time_ids: torch.Tensor  # [b, 6] (orig_h, orig_w, crop_top, crop_left, target_h, target_w)


def sample_choices(dataset: ScannedDataset, key: SampleKey, seed: int):
    """(latent item, caption) of one planned sample: the flip and the augmented caption."""
    record = dataset.records[key.record]
    spec = dataset.specs[record.subset_index]
    rng = sample_rng(seed, key)
    flip = spec.flip and rng.random() < 0.5
    return latent_item(record, flip), augment_caption(record.caption, spec.captions, rng)


def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Latents of [-1, 1] pixels: the VAE posterior's mean times its scaling factor (deterministic)."""
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        posterior = vae.encode(pixels.to(vae.device, dtype)).latent_dist
        return (posterior.mean * vae.config.scaling_factor).float()


def load_batch(dataset: ScannedDataset, keys: list[SampleKey], seed: int, *, latent_cache=None, vae=None) -> Batch:
    """The tensors of one planned batch; latents from the cache when given, else encoded now."""
    items, captions = zip(*(sample_choices(dataset, key, seed) for key in keys))
    if latent_cache is not None:
        latents = torch.stack([latent_cache.load(item) for item in items]).float()
    else:
        latents = encode_pixels(vae, torch.stack([latent_pixels(item) for item in items]))
    time_ids = torch.tensor([sdxl_time_ids(i.original_size, i.crop_top_left, i.bucket) for i in items],
                            dtype=torch.float32)
    return Batch(latents=latents, captions=list(captions), time_ids=time_ids)
