"""Pixels to latents: the VAE encoding of the latent cache, and of each step's pixels when the cache is off."""

from __future__ import annotations

import torch


def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Latents of [-1, 1] pixels: the VAE posterior's mean times its scaling factor (deterministic)."""
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        posterior = vae.encode(pixels.to(vae.device, dtype)).latent_dist
        return (posterior.mean * vae.config.scaling_factor).float()
