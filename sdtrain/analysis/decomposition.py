"""Magnitude and direction change of one weight against its base (the DoRA paper's ΔM and ΔD).

Channels are the rows (axis "output": one per output channel, a conv filter flattened over in·kh·kw) or
the columns (axis "input": one per input channel, flattened over out·kh·kw) of the weight. With m_c = ‖W_c‖:

    ΔM = mean_c |m'_c − m0_c|          ΔD = mean_c (1 − cos(W'_c, W0_c))

1 − cos is computed as ½‖W'_c/‖W'_c‖ − W0_c/‖W0_c‖‖² in float64, which keeps small rotations exact
instead of losing them to the cancellation in 1 − (a·b)/(‖a‖‖b‖).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtrain.adapters.spec import AXES


def channel_vectors(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """[channels, features] view of a weight: rows for axis "output", columns for axis "input"."""
    if axis == "output":
        return weight.reshape(weight.shape[0], -1)
    if axis == "input":
        return weight.transpose(0, 1).reshape(weight.shape[1], -1)
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


@dataclass(frozen=True)
class DecompositionChange:
    """ΔM, ΔD and the mean base magnitude (for relative scales) of one weight, over `channels` channels."""

    delta_m: float
    delta_d: float
    m0_mean: float
    channels: int


def decomposition_change(base: torch.Tensor, updated: torch.Tensor, axis: str = "output") -> DecompositionChange:
    """ΔM and ΔD of `updated` (W') against `base` (W0), channels along `axis`."""
    if tuple(base.shape) != tuple(updated.shape):
        raise ValueError(f"weights differ in shape: base {list(base.shape)}, updated {list(updated.shape)}")
    w0 = channel_vectors(base.detach().to(torch.float64), axis)
    w1 = channel_vectors(updated.detach().to(torch.float64), axis)
    m0 = w0.norm(dim=1)
    m1 = w1.norm(dim=1)
    tiny = torch.finfo(torch.float64).tiny
    u0 = w0 / m0.clamp_min(tiny).unsqueeze(1)
    u1 = w1 / m1.clamp_min(tiny).unsqueeze(1)
    one_minus_cos = 0.5 * (u1 - u0).square().sum(1)
    return DecompositionChange(
        delta_m=float((m1 - m0).abs().mean()),
        delta_d=float(one_minus_cos.mean()),
        m0_mean=float(m0.mean()),
        channels=int(m0.numel()),
    )
