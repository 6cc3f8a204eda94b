import math

import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_snr

from sdtrain.errors import ConfigError
from sdtrain.train.loss import (diffusion_loss, min_snr_weights, sample_noise, sample_timesteps,
                                training_noise_scheduler, training_target)


@pytest.fixture(scope="module")
def scheduler():
    return training_noise_scheduler(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear", prediction_type="epsilon"))


def _alphas_cumprod_numpy():
    # SD's "scaled_linear" schedule: betas linear in sqrt space from 0.00085 to 0.012 over 1000 steps
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_diffusers_snr_matches_betas_computed_here(scheduler):
    """The trainer's min-SNR weights take diffusers' compute_snr: check it against the schedule computed here."""
    acp = _alphas_cumprod_numpy()
    t = torch.tensor([0, 10, 250, 500, 999])
    expected = acp[t.numpy()] / (1 - acp[t.numpy()])
    np.testing.assert_allclose(compute_snr(scheduler, t).numpy(), expected, rtol=1e-4)
    # by hand at t = 0: ᾱ = 1 − 0.00085
    assert compute_snr(scheduler, torch.tensor([0])).item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)


def test_min_snr_weights_hand_values():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    torch.testing.assert_close(min_snr_weights(snr, 0.0, "epsilon"), torch.ones(3))


def test_epsilon_target_is_the_noise(scheduler):
    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.equal(training_target(scheduler, latents, noise, torch.tensor([3, 700])), noise)


def test_v_target_formula(scheduler):
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([3, 700])
    acp = torch.tensor(_alphas_cumprod_numpy()[t.numpy()], dtype=torch.float32).view(2, 1, 1, 1)
    expected = acp.sqrt() * noise - (1 - acp).sqrt() * latents
    got = training_target(scheduler, latents, noise, t, prediction_type="v_prediction")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_noise_without_offset_is_plain_randn():
    latents = torch.zeros(2, 4, 8, 8)
    got = sample_noise(latents, torch.Generator().manual_seed(7), 0.0)
    assert torch.equal(got, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)))


def test_noise_offset_replayed_and_statistics():
    latents = torch.zeros(256, 4, 16, 16)
    got = sample_noise(latents, torch.Generator().manual_seed(3), 0.1)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(256, 4, 16, 16, generator=g)
    expected = base + 0.1 * torch.randn(256, 4, 1, 1, generator=g)
    torch.testing.assert_close(got, expected)
    # per-(sample, channel) means: variance 1/256 from the pixels plus 0.1² from the offset
    channel_means = got.mean(dim=(2, 3))
    assert channel_means.var().item() == pytest.approx(1 / 256 + 0.01, rel=0.15)
    assert base.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 256, rel=0.15)


def test_timesteps_range_and_errors():
    t = sample_timesteps(5000, torch.Generator().manual_seed(0), 100, 200, 1000)
    assert t.dtype == torch.int64 and t.shape == (5000,)
    assert t.min().item() == 100 and t.max().item() == 199
    with pytest.raises(ConfigError, match="train.min_timestep"):
        sample_timesteps(2, None, 500, 500, 1000)
    with pytest.raises(ConfigError):
        sample_timesteps(2, None, 0, 1001, 1000)


def test_loss_kinds_hand_values():
    pred = torch.tensor([[1.0, 3.0], [0.5, -0.5]])
    target = torch.zeros(2, 2)
    # per-sample means: l2 [5, 0.25], l1 [2, 0.5]
    assert diffusion_loss(pred, target, "l2").item() == pytest.approx((5 + 0.25) / 2)
    assert diffusion_loss(pred, target, "l1").item() == pytest.approx((2 + 0.5) / 2)
    w = torch.tensor([1.0, 4.0])
    assert diffusion_loss(pred, target, "l2", weights=w).item() == pytest.approx((5 * 1 + 0.25 * 4) / 2)

    c = 1.0
    huber = [2 * c * (math.sqrt(d * d + c * c) - c) for d in (1.0, 3.0, 0.5, -0.5)]
    expected = ((huber[0] + huber[1]) / 2 + (huber[2] + huber[3]) / 2) / 2
    assert diffusion_loss(pred, target, "huber", huber_c=c).item() == pytest.approx(expected, rel=1e-6)
    assert huber[1] == pytest.approx(4.324555, rel=1e-6)  # 2(√10 − 1)


def test_huber_limits():
    small, big = torch.tensor([[1e-3]]), torch.tensor([[100.0]])
    zero = torch.zeros(1, 1)
    assert diffusion_loss(small, zero, "huber", huber_c=0.1).item() == pytest.approx(1e-6, rel=1e-3)  # ≈ d²
    assert diffusion_loss(big, zero, "huber", huber_c=0.1).item() == pytest.approx(2 * 0.1 * 100, rel=2e-3)  # ≈ 2c|d|


def test_unknown_loss_kind():
    with pytest.raises(ConfigError, match="train.loss"):
        diffusion_loss(torch.zeros(1, 1), torch.zeros(1, 1), "mse")
