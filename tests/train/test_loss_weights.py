"""Debiased estimation, v-prediction scaled like noise prediction and prior_loss_weight, against closed forms."""

import pytest
import torch
from diffusers.training_utils import compute_snr

from sdtrain.errors import ConfigError
from sdtrain.train.loss import diffusion_loss, min_snr_weights, training_noise_scheduler
from sdtrain.train.loss_weights import (debiased_estimation_weights, prediction_notes, sample_weights,
                                        v_pred_like_noise_pred_weights)

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="v_prediction")
T = torch.tensor([0, 1, 50, 400, 999])


def alpha_bar(scheduler, t):
    return scheduler.alphas_cumprod.double()[t]


def test_debiased_weights_equal_the_closed_form():
    scheduler = training_noise_scheduler(SCHEDULE)
    acp = alpha_bar(scheduler, T)
    snr = (acp / (1 - acp)).clamp(max=1000)  # kohya caps the SNR at 1000 (SNR(0) ≈ 1175)
    got_eps = debiased_estimation_weights(compute_snr(scheduler, T).double(), "epsilon")
    got_v = debiased_estimation_weights(compute_snr(scheduler, T).double(), "v_prediction")
    torch.testing.assert_close(got_eps, 1 / snr.sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(got_v, 1 / (snr + 1), rtol=1e-5, atol=0)
    assert got_eps[0].item() == pytest.approx(1000 ** -0.5)


def test_v_loss_scaled_like_noise_pred_is_the_epsilon_loss():
    """ε̂ − ε = √ᾱ (v̂ − v), so ᾱ·‖v̂ − v‖² = ‖ε̂ − ε‖², and SNR / (SNR + 1) = ᾱ (below the SNR cap)."""
    scheduler = training_noise_scheduler(SCHEDULE)
    t = torch.tensor([1, 50, 400, 999])
    g = torch.Generator().manual_seed(0)
    x0, eps, v_hat = (torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    acp = alpha_bar(scheduler, t).view(-1, 1, 1, 1)
    x_t = acp.sqrt() * x0 + (1 - acp).sqrt() * eps
    v = acp.sqrt() * eps - (1 - acp).sqrt() * x0
    eps_hat = (1 - acp).sqrt() * x_t + acp.sqrt() * v_hat
    weights = v_pred_like_noise_pred_weights(compute_snr(scheduler, t).double())
    got = diffusion_loss(v_hat, v, "l2", weights=weights)
    assert got.item() == pytest.approx(diffusion_loss(eps_hat, eps, "l2").item(), rel=1e-4)
    assert v_pred_like_noise_pred_weights(torch.tensor([5000.0])).item() == pytest.approx(1000 / 1001)


def test_sample_weights_multiply_and_prior_loss_weight_scales_reg_images():
    snr = torch.tensor([0.5, 4.0, 20.0], dtype=torch.float64)
    assert sample_weights(snr, "epsilon", [False, True, False]) is None  # nothing on
    got = sample_weights(snr, "v_prediction", [False, True, True], min_snr_gamma=5.0, debiased_estimation=True,
                         scale_v_pred_loss_like_noise_pred=True, prior_loss_weight=0.25)
    expected = (torch.tensor([1, 0.25, 0.25], dtype=torch.float64) * snr.clamp(max=5) / (snr + 1)
                * snr / (snr + 1) / (snr + 1))
    torch.testing.assert_close(got, expected)
    prior = sample_weights(snr, "epsilon", [True, False, True], prior_loss_weight=2.0)
    torch.testing.assert_close(prior, torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64))
    # the loss of a batch: reg samples count prior_loss_weight times
    pred, target = torch.ones(3, 2), torch.zeros(3, 2)
    assert diffusion_loss(pred, target, weights=prior).item() == pytest.approx(5 / 3)


def test_min_snr_epsilon_weight_at_zero_snr_is_its_limit():
    torch.testing.assert_close(min_snr_weights(torch.tensor([0.0, 2.0, 10.0]), 5.0, "epsilon"),
                               torch.tensor([1.0, 1.0, 0.5]))


def test_prediction_type_checks():
    assert prediction_notes("v_prediction", zero_terminal_snr=True, debiased_estimation=True,
                            scale_v_pred_loss_like_noise_pred=True) == []
    assert "meant for v-prediction" in prediction_notes("epsilon", zero_terminal_snr=True)[0]
    with pytest.raises(ConfigError, match="scale_v_pred_loss_like_noise_pred needs a v-prediction model"):
        prediction_notes("epsilon", scale_v_pred_loss_like_noise_pred=True)
    with pytest.raises(ConfigError, match="infinite at the last timestep"):
        prediction_notes("epsilon", zero_terminal_snr=True, debiased_estimation=True)
