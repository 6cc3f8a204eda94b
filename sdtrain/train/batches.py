"""Turning planned batches into training tensors: latents, captions and SDXL size/crop conditioning.

Per-sample randomness (flip, caption augmentation) comes from `sample_rng(seed, key)`, seeded by the
sample's place in the plan, so a resumed run draws exactly what an uninterrupted one would have. Loss masks
(`sdtrain.data.masks`) come with their latents: from the latent cache, or cut and flipped like the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtrain.data.buckets import sdxl_time_ids
from sdtrain.data.captions import augment_caption
from sdtrain.data.dataset import ScannedDataset, SampleKey, latent_item, latent_pixels, sample_rng
from sdtrain.data.masks import batch_masks, latent_mask


@dataclass
class Batch:
    latents: torch.Tensor  # [b, 4, h/8, w/8], already multiplied by the VAE scaling factor
    captions: list[str]
    time_ids: torch.Tensor  # [b, 6] (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
    masks: torch.Tensor | None = None  # [b, 1, h/8, w/8] loss masks in [0, 1] (ones for unmasked samples), or None


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
    latents, masks = load_latents(items, latent_cache=latent_cache, vae=vae)
    time_ids = torch.tensor([sdxl_time_ids(i.original_size, i.crop_top_left, i.bucket) for i in items],
                            dtype=torch.float32)
    return Batch(latents=latents, captions=list(captions), time_ids=time_ids, masks=masks)


def load_latents(items, *, latent_cache=None, vae=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents [b, 4, h, w], loss masks [b, 1, h, w] or None) of latent items sharing a bucket."""
    if latent_cache is not None:
        latents, masks = zip(*(latent_cache.load_with_mask(item) for item in items))
        latents = torch.stack(latents).float()
    else:
        latents = encode_pixels(vae, torch.stack([latent_pixels(item) for item in items]))
        masks = [None if item.mask is None else latent_mask(item, latents.shape[-2:]) for item in items]
    return latents, batch_masks(list(masks), latents)
