"""Multires noise, input perturbation and the zero-terminal-SNR schedule, against formulas written out here."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdtrain.train.loss import sample_noise, training_noise_scheduler
from sdtrain.train.noise import multires_noise, perturbed_noise

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="v_prediction")


def neighbour_correlation(noise):
    """Correlation of horizontally adjacent values, over every sample and channel."""
    a, b = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_multires_noise_replays_kohyas_pyramid():
    """kohya's pyramid_noise_like written out with the same draws: level i at (h / rⁱ, w / rⁱ), r in [2, 4),
    upsampled bilinearly, times discountⁱ, divided by the std at the end."""
    base = torch.randn(1, 4, 32, 24, generator=torch.Generator().manual_seed(1))
    got = multires_noise(base.clone(), torch.Generator().manual_seed(5), 3, 0.3)
    g = torch.Generator().manual_seed(5)
    expected = base.clone().double()
    for i in range(3):
        r = torch.rand((), generator=g, dtype=torch.float64).item() * 2 + 2
        hn, wn = max(1, int(32 / r ** i)), max(1, int(24 / r ** i))
        level = torch.randn(1, 4, hn, wn, generator=g)
        expected += F.interpolate(level, size=(32, 24), mode="bilinear").double() * 0.3 ** i
    expected /= expected.std()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_multires_noise_is_unit_std_and_low_frequency():
    latents = torch.zeros(1, 4, 64, 64)
    plain = sample_noise(latents, torch.Generator().manual_seed(0))
    pyramid = sample_noise(latents, torch.Generator().manual_seed(0), multires_iterations=8, multires_discount=0.8)
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(neighbour_correlation(plain)) < 0.05
    assert neighbour_correlation(pyramid) > 0.15  # coarse levels make neighbours alike
    # the first level (r⁰ = 1) is full-resolution noise: one iteration is (ε + ε') / std
    g = torch.Generator().manual_seed(2)
    one = sample_noise(latents, g, multires_iterations=1)
    g = torch.Generator().manual_seed(2)
    eps = torch.randn(1, 4, 64, 64, generator=g)
    torch.rand((), generator=g, dtype=torch.float64)
    total = eps + torch.randn(1, 4, 64, 64, generator=g)
    torch.testing.assert_close(one, total / total.std())


def test_multires_noise_stops_at_one_pixel():
    noise = multires_noise(torch.zeros(1, 1, 8, 8) + torch.randn(1, 1, 8, 8), torch.Generator().manual_seed(0), 64, 0.5)
    assert torch.isfinite(noise).all() and noise.std().item() == pytest.approx(1.0, abs=1e-5)


def test_input_perturbation_adds_gamma_times_fresh_noise():
    eps = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(9)
    got = perturbed_noise(eps, g, 0.1)
    xi = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, eps + 0.1 * xi)
    assert (got - eps).std().item() == pytest.approx(0.1, rel=0.05)
    g = torch.Generator().manual_seed(9)
    assert perturbed_noise(eps, g, 0.0) is eps
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=torch.Generator().manual_seed(9)))


def test_zero_terminal_snr_makes_the_last_alpha_bar_zero():
    """Lin et al. 2024, Algorithm 1, in float64 here: √ᾱ shifted so its last value is 0 and scaled so its first is
    kept."""
    plain = training_noise_scheduler(SD_SCHEDULE)
    rescaled = training_noise_scheduler(SD_SCHEDULE, zero_terminal_snr=True)
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    root = np.sqrt(np.cumprod(1 - betas))
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert plain.alphas_cumprod[-1].item() > 0.004
    np.testing.assert_allclose(rescaled.alphas_cumprod.double().numpy(), expected, rtol=1e-4, atol=1e-9)
    # at the last timestep the noisy latents are the noise, and the v target is −x₀
    x0, eps, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([999])
    torch.testing.assert_close(rescaled.add_noise(x0, eps, t), eps)
    torch.testing.assert_close(rescaled.get_velocity(x0, eps, t), -x0)
