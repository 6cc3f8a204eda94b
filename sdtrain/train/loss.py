"""Noise, timesteps, targets and the weighted diffusion loss of one training step.

Use a `DDPMScheduler` built from the model's scheduler config (`training_noise_scheduler`) for `add_noise`,
targets and SNR: the samplers' schedulers (Euler, PNDM) add noise in a different parameterisation.

Min-SNR weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
SNR(t) = ᾱ_t / (1 - ᾱ_t) (diffusers' `training_utils.compute_snr`); the loss weight of an ε-prediction is
min(SNR, γ) / SNR and of a v-prediction min(SNR, γ) / (SNR + 1).

The config schema takes `LOSS_KINDS` from here, so torch is imported where it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

LOSS_KINDS = ("l2", "l1", "huber")


def training_noise_scheduler(scheduler_config):
    """A DDPMScheduler with the model's noise schedule and prediction type."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config)


def _randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, returned on `like`'s device and dtype."""
    import torch

    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None = None, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, plus `noise_offset` × one N(0, 1) value per sample and channel (kohya's
    noise offset, which lets the model shift an image's mean brightness)."""
    noise = _randn(latents.shape, generator, latents)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * _randn((b, c) + (1,) * (latents.ndim - 2), generator, latents)
    return noise


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None = None,
    min_timestep: int = 0,
    max_timestep: int = 1000,
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`batch` integer timesteps drawn uniformly from [min_timestep, max_timestep) (int64)."""
    if not 0 <= min_timestep < max_timestep <= num_train_timesteps:
        raise ConfigError(f"train.min_timestep = {min_timestep} and train.max_timestep = {max_timestep} must satisfy "
                          f"0 <= min_timestep < max_timestep <= {num_train_timesteps}")
    import torch

    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(min_timestep, max_timestep, (batch,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def prediction_type_of(scheduler, prediction_type: str | None = None) -> str:
    """`prediction_type` unless None/"auto", else the scheduler config's."""
    kind = scheduler.config.prediction_type if prediction_type in (None, "auto") else prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ConfigError(f"model.prediction_type = {kind!r} is not supported; use 'epsilon' or 'v_prediction'")
    return kind


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str | None = None) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity √ᾱ·ε − √(1−ᾱ)·x₀ (v_prediction)."""
    if prediction_type_of(scheduler, prediction_type) == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-sample Min-SNR-γ loss weights; all ones when `gamma` is 0 (off)."""
    if gamma <= 0:
        return snr.new_ones(snr.shape)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.1,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar loss: elementwise loss averaged per sample, multiplied by `weights` [b], averaged over the batch.

    l2: (p − t)²; l1: |p − t|; huber: the pseudo-Huber 2c(√((p − t)² + c²) − c) that kohya's sd-scripts uses
    (≈ (p − t)² near 0, ≈ 2c|p − t| far from it). Computed in float32.
    """
    diff = pred.float() - target.float()
    if kind == "l2":
        elementwise = diff.square()
    elif kind == "l1":
        elementwise = diff.abs()
    elif kind == "huber":
        elementwise = 2 * huber_c * ((diff.square() + huber_c**2).sqrt() - huber_c)
    else:
        raise ConfigError(f"train.loss = {kind!r} is not supported; use one of {', '.join(LOSS_KINDS)}")
    per_sample = elementwise.flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()
