"""Per-sample loss weights beyond Min-SNR-γ (in `loss.py`), and the checks of their prediction type.

SNR(t) = ᾱ_t / (1 − ᾱ_t) (diffusers' `training_utils.compute_snr`). The weights of the options that are on are
multiplied (kohya sd-scripts `post_process_loss` and `library/custom_train_functions.py`, commit 48d368f):
- Min-SNR-γ (Hang et al. 2023): `loss.min_snr_weights`;
- `scale_v_pred_loss_like_noise_pred` (v-prediction only): SNR / (SNR + 1), SNR capped at 1000: a v loss
  weighted so is the ε loss of the same prediction;
- debiased estimation (Yu et al. 2024): 1 / √SNR for ε, 1 / (SNR + 1) for v, SNR capped at 1000;
- `prior_loss_weight` on regularisation images (kohya multiplies their loss by it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from sdtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

SNR_CAP = 1000.0  # kohya caps the SNR of the v-scaling and debiased weights (SNR(0) is about 1175 for SD)


def v_pred_like_noise_pred_weights(snr: torch.Tensor) -> torch.Tensor:
    """kohya's `scale_v_pred_loss_like_noise_pred`: SNR / (SNR + 1), SNR capped at 1000."""
    capped = snr.clamp(max=SNR_CAP)
    return capped / (capped + 1.0)


def debiased_estimation_weights(snr: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """kohya's `debiased_estimation_loss`: 1/√SNR (ε) or 1/(SNR + 1) (v), SNR capped at 1000."""
    capped = snr.clamp(max=SNR_CAP)
    if prediction_type == "epsilon":
        return capped.rsqrt()
    if prediction_type == "v_prediction":
        return 1.0 / (capped + 1.0)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def sample_weights(snr: torch.Tensor, prediction_type: str, is_reg: Sequence[bool] = (), *, min_snr_gamma: float = 0.0,
                   scale_v_pred_loss_like_noise_pred: bool = False, debiased_estimation: bool = False,
                   prior_loss_weight: float = 1.0) -> torch.Tensor | None:
    """The per-sample loss weights [b] of the options that are on, multiplied; None when none is."""
    import torch

    from sdtrain.train.loss import min_snr_weights

    factors = []
    if prior_loss_weight != 1.0 and any(is_reg):
        factors.append(torch.tensor([prior_loss_weight if reg else 1.0 for reg in is_reg], dtype=snr.dtype,
                                    device=snr.device))
    if min_snr_gamma:
        factors.append(min_snr_weights(snr, min_snr_gamma, prediction_type))
    if scale_v_pred_loss_like_noise_pred:
        factors.append(v_pred_like_noise_pred_weights(snr))
    if debiased_estimation:
        factors.append(debiased_estimation_weights(snr, prediction_type))
    if not factors:
        return None
    weights = factors[0]
    for factor in factors[1:]:
        weights = weights * factor
    return weights


def prediction_notes(prediction_type: str, *, zero_terminal_snr: bool = False, debiased_estimation: bool = False,
                     scale_v_pred_loss_like_noise_pred: bool = False) -> list[str]:
    """Warnings for the noise and loss settings under `prediction_type`; ConfigError for combinations that
    cannot train (kohya refuses the v-scaling without v-prediction; 1/√SNR is infinite at zero terminal SNR)."""
    if prediction_type == "epsilon" and scale_v_pred_loss_like_noise_pred:
        raise ConfigError("train.scale_v_pred_loss_like_noise_pred needs a v-prediction model, but the model predicts "
                          "epsilon; set it to false (or model.prediction_type = \"v_prediction\" for a v model)")
    if prediction_type == "epsilon" and zero_terminal_snr and debiased_estimation:
        raise ConfigError("train.debiased_estimation_loss weights an epsilon loss by 1/sqrt(SNR), which is infinite at "
                          "the last timestep under train.zero_terminal_snr; turn one of them off")
    if prediction_type == "epsilon" and zero_terminal_snr:
        return ["train.zero_terminal_snr with an epsilon-prediction model: at the last timestep the input is pure "
                "noise and the target equals it, so training there teaches nothing and samples may come out grey "
                "(kohya warns the same); zero-terminal SNR is meant for v-prediction (model.prediction_type)"]
    return []
