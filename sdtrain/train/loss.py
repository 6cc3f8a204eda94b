"""Noise, timesteps, targets and the weighted diffusion loss of one training step.

Use a `DDPMScheduler` built from the model's scheduler config (`training_noise_scheduler`) for `add_noise`,
targets and SNR: the samplers' schedulers (Euler, PNDM) add noise in a different parameterisation. With
`zero_terminal_snr` its betas are rescaled by diffusers' `rescale_zero_terminal_snr` (Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed"), so that ᾱ at the last timestep is exactly 0: the model
sees pure noise there, which only a v-prediction model can learn from (an ε-prediction target equals the input).

Every draw of one sample (its noise, noise offset, multires noise, timestep, input perturbation: `noise.py`,
`timesteps.py`) comes from that sample's own generator, in that order, so a draw does not depend on the batch,
the process count or resuming.

Min-SNR weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
SNR(t) = ᾱ_t / (1 - ᾱ_t) (diffusers' `training_utils.compute_snr`); the loss weight of an ε-prediction is
min(SNR, γ) / SNR and of a v-prediction min(SNR, γ) / (SNR + 1). At SNR = 0 (the last timestep under
zero-terminal SNR) the ε weight is its limit 1 (kohya divides 0 by 0). Other weights: `loss_weights.py`.

The config schema takes `LOSS_KINDS` from here, so torch is imported where it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

LOSS_KINDS = ("l2", "l1", "huber")


def training_noise_scheduler(scheduler_config, zero_terminal_snr: bool = False):
    """A DDPMScheduler with the model's noise schedule and prediction type; with `zero_terminal_snr`, betas
    rescaled so that ᾱ is 0 at the last timestep (diffusers' `rescale_betas_zero_snr`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config, **({"rescale_betas_zero_snr": True} if zero_terminal_snr else {}))


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None = None, noise_offset: float = 0.0,
                 multires_iterations: int = 0, multires_discount: float = 0.3) -> torch.Tensor:
    """Gaussian noise like `latents`, plus `noise_offset` × one N(0, 1) value per sample and channel (kohya's
    noise offset, which lets the model shift an image's mean brightness), then `noise.multires_noise` when
    `multires_iterations` > 0."""
    from sdtrain.train.noise import multires_noise, randn

    noise = randn(latents.shape, generator, latents)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * randn((b, c) + (1,) * (latents.ndim - 2), generator, latents)
    if multires_iterations:
        noise = multires_noise(noise, generator, multires_iterations, multires_discount)
    return noise


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None = None,
    min_timestep: int = 0,
    max_timestep: int = 1000,
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
    sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """`batch` integer timesteps in [min_timestep, max_timestep) (int64): uniform integers by default, else
    drawn from `sampling` and `shift` (`timesteps.draw_timesteps`)."""
    if not 0 <= min_timestep < max_timestep <= num_train_timesteps:
        raise ConfigError(f"train.min_timestep = {min_timestep} and train.max_timestep = {max_timestep} must satisfy "
                          f"0 <= min_timestep < max_timestep <= {num_train_timesteps}")
    from sdtrain.train.timesteps import draw_timesteps

    t = draw_timesteps(batch, generator, min_timestep, max_timestep, sampling, logit_mean, logit_std, shift)
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
    import torch

    if gamma <= 0:
        return snr.new_ones(snr.shape)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def masked_mean(elementwise: torch.Tensor, mask: torch.Tensor | None, normalize: bool = True) -> torch.Tensor:
    """Per-sample mean [b] of an elementwise loss [b, c, h, w] weighted by a loss mask [b, 1, h, w] in [0, 1].

    normalize: Σ(loss·mask) / Σ(mask) over each sample (its masked area's mean loss; 0 for an all-zero mask);
    else mean(loss·mask) over the whole sample, as kohya's `apply_masked_loss` followed by its per-sample mean.
    """
    if mask is None:
        return elementwise.flatten(1).mean(dim=1)
    weighted = (elementwise * mask.to(elementwise)).flatten(1)
    if not normalize:
        return weighted.mean(dim=1)
    area = mask.to(elementwise).expand_as(elementwise).flatten(1).sum(dim=1)
    return weighted.sum(dim=1) / area.clamp_min(1e-8)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.1,
                   weights: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   normalize_mask: bool = True) -> torch.Tensor:
    """Scalar loss: elementwise loss, weighted by the loss `mask` and averaged per sample (`masked_mean`),
    multiplied by the per-sample `weights` [b], averaged over the batch.

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
    per_sample = masked_mean(elementwise, mask, normalize_mask)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()
