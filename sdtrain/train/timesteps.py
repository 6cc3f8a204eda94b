"""How training timesteps are drawn.

"uniform" without a shift: integers uniform in [min_timestep, max_timestep) (`torch.randint`). Otherwise u in
(0, 1) from diffusers' `compute_density_for_timestep_sampling` ("uniform": U(0, 1); "logit_normal": the sigmoid
of N(logit_mean, logit_std), Esser et al. 2024), shifted by u ↦ s·u / (1 + (s − 1)·u) (s > 1 favours noisier
timesteps, as SD3's and Flux's schedule shift), mapped to min + ⌊u·(max − min)⌋ (kohya's SD3
`get_noisy_model_input_and_timesteps`, commit 48d368f, maps its u the same way).

The config schema takes `TIMESTEP_SAMPLINGS` from here, so torch is imported where it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def shift_timesteps(u: torch.Tensor, shift: float) -> torch.Tensor:
    """u ↦ s·u / (1 + (s − 1)·u) on (0, 1): s > 1 moves the draws towards 1 (noisier), s < 1 towards 0."""
    return u * shift / (1 + (shift - 1) * u)


def draw_timesteps(batch: int, generator: torch.Generator | None, min_timestep: int, max_timestep: int,
                   sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                   shift: float = 1.0) -> torch.Tensor:
    """`batch` int64 timesteps in [min_timestep, max_timestep) on the generator's device (see the module
    docstring)."""
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ConfigError(f"train.timestep_sampling = {sampling!r} is not supported; use one of "
                          f"{', '.join(TIMESTEP_SAMPLINGS)}")
    if not (logit_std > 0 and shift > 0):
        raise ConfigError(f"train.logit_std = {logit_std} and train.timestep_shift = {shift} must be positive")
    import torch

    gen_device = generator.device if generator is not None else "cpu"
    if sampling == "uniform" and shift == 1.0:
        return torch.randint(min_timestep, max_timestep, (batch,), generator=generator, device=gen_device)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(sampling, batch, logit_mean=logit_mean, logit_std=logit_std,
                                              device=gen_device, generator=generator)
    u = shift_timesteps(u.double(), shift)
    return (min_timestep + u * (max_timestep - min_timestep)).floor().long().clamp(min_timestep, max_timestep - 1)
