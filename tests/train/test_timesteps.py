"""Timestep distributions: the empirical CDF of many draws against the closed-form CDF."""

import math

import pytest
import torch

from sdtrain.errors import ConfigError
from sdtrain.train.loss import sample_timesteps
from sdtrain.train.timesteps import draw_timesteps, shift_timesteps

N = 40000


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def empirical_cdf(t, k):
    return (t < k).double().mean().item()


def test_default_draw_is_randint_unchanged():
    """The default path draws exactly torch.randint (runs from before these options replay bit for bit)."""
    got = sample_timesteps(16, torch.Generator().manual_seed(4), 10, 900, 1000)
    assert torch.equal(got, torch.randint(10, 900, (16,), generator=torch.Generator().manual_seed(4)))


def test_logit_normal_timesteps_have_the_logit_normal_distribution():
    """t = ⌊1000·σ(z)⌋, z ~ N(m, s): P(t < k) = Φ((logit(k/1000) − m)/s)."""
    m, s = 0.5, 0.8
    t = sample_timesteps(N, torch.Generator().manual_seed(0), 0, 1000, 1000, sampling="logit_normal", logit_mean=m,
                         logit_std=s)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
    for k in (100, 250, 500, 622, 750, 900):
        expected = normal_cdf((math.log(k / (1000 - k)) - m) / s)
        assert empirical_cdf(t, k) == pytest.approx(expected, abs=0.01), k
    # the logit of the (bin-centred) draws has mean m and std s
    z = torch.logit((t.double() + 0.5) / 1000)
    assert z.mean().item() == pytest.approx(m, abs=0.02) and z.std().item() == pytest.approx(s, abs=0.02)


def test_shifted_uniform_timesteps_have_the_shifted_distribution():
    """u' = s·u / (1 + (s − 1)·u), u ~ U(0, 1): P(u' < x) = x / (s − (s − 1)·x); mapped into [min, max)."""
    s, lo, hi = 3.0, 100, 900
    t = sample_timesteps(N, torch.Generator().manual_seed(1), lo, hi, 1000, shift=s)
    assert lo <= t.min() and t.max() < hi
    for k in (200, 400, 500, 700, 850):
        x = (k - lo) / (hi - lo)
        assert empirical_cdf(t, k) == pytest.approx(x / (s - (s - 1) * x), abs=0.01), k
    assert t.double().mean().item() > 600  # s > 1: noisier than uniform's 500


def test_shift_is_the_identity_at_one_and_inverts():
    u = torch.rand(100, dtype=torch.float64)
    torch.testing.assert_close(shift_timesteps(u, 1.0), u)
    torch.testing.assert_close(shift_timesteps(shift_timesteps(u, 3.0), 1 / 3.0), u)


def test_logit_normal_and_shift_compose():
    m, s, shift = -0.3, 1.2, 2.0
    t = draw_timesteps(N, torch.Generator().manual_seed(2), 0, 1000, "logit_normal", m, s, shift)
    for k in (200, 500, 800):
        x = k / 1000
        u = x / (shift - (shift - 1) * x)  # the unshifted value that maps to x
        assert empirical_cdf(t, k) == pytest.approx(normal_cdf((math.log(u / (1 - u)) - m) / s), abs=0.01)


def test_bad_timestep_settings_name_the_key():
    with pytest.raises(ConfigError, match="train.timestep_sampling"):
        draw_timesteps(2, None, 0, 1000, "cosine")
    with pytest.raises(ConfigError, match="train.logit_std"):
        draw_timesteps(2, None, 0, 1000, "logit_normal", 0.0, 0.0)
