"""The noise options of a training step beyond plain Gaussian noise and kohya's noise offset (in `loss.py`).

kohya sd-scripts defines them (`library/custom_train_functions.py` `pyramid_noise_like`, `library/train_util.py`
`get_noise_noisy_latents_and_timesteps`; commit 48d368f):
- multires (pyramid) noise: for i < iterations, with r uniform in [2, 4), add N(0, 1) noise drawn at
  (h / rⁱ, w / rⁱ) (each side at least 1), bilinearly upsampled, times discountⁱ; stop after a 1-pixel side;
  then divide by the standard deviation. kohya divides by the whole batch's; here each sample by its own (the
  same at batch size 1; independent of how a batch is split over processes);
- input perturbation (Ning et al. 2023, kohya `ip_noise_gamma`): the noisy latents are made with ε + γ·ξ,
  ξ ~ N(0, 1), while the target stays ε.

Every draw comes from the generator it is given (the trainer passes each sample's own, see `loss.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, returned on `like`'s device and dtype."""
    import torch

    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def multires_noise(noise: torch.Tensor, generator: torch.Generator | None, iterations: int,
                   discount: float) -> torch.Tensor:
    """kohya's multires (pyramid) noise on `noise` [b, c, h, w] (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = noise.shape
    gen_device = generator.device if generator is not None else noise.device
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator, device=gen_device, dtype=torch.float64).item()
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = randn((b, c, hn, wn), generator, noise)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def perturbed_noise(noise: torch.Tensor, generator: torch.Generator | None, gamma: float) -> torch.Tensor:
    """The noise the noisy latents are made with: `noise` + γ·ξ, ξ ~ N(0, 1) (input perturbation); `noise`
    itself when γ is 0 (nothing is drawn)."""
    if not gamma:
        return noise
    return noise + gamma * randn(noise.shape, generator, noise)
