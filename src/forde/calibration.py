"""Calibration of a predictive, as the field reports it: the Brier score, adaptive (equal-mass) and maximum
calibration errors, the reliability curve, and temperature scaling fitted on a validation split.

Inputs are log-probabilities [N, C] of the predictive (for an ensemble: `metrics.ensemble_log_probs`, the log of the
members' mean probabilities) and labels [N]; reductions in float64. The equal-width ECE is `metrics.ece`.
"""

from __future__ import annotations

import math

import torch

from forde.metrics import calibration_bins


def brier(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over samples of sum_c (p_c - [c = y])^2 (0 is perfect, 2 the worst)."""
    p = log_probs.double().exp()
    onehot = torch.nn.functional.one_hot(labels, p.shape[-1]).double()
    return (p - onehot).square().sum(-1).mean().item()


def _confidence_and_correct(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conf, pred = log_probs.double().exp().max(-1)
    return conf, (pred == labels).double()


def adaptive_ece(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE over equal-mass bins: the samples sorted by confidence and split into `n_bins` bins of (nearly) equal
    size (sizes differ by at most one), each weighted by its share of the samples."""
    conf, correct = _confidence_and_correct(log_probs, labels)
    order = torch.argsort(conf, stable=True)
    total = 0.0
    for part in torch.tensor_split(order, min(n_bins, len(order))):
        total += len(part) * abs(correct[part].mean().item() - conf[part].mean().item())
    return total / len(order)


def mce(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Maximum calibration error: the largest |accuracy - confidence| over the non-empty equal-width bins."""
    bins = calibration_bins(log_probs, labels, n_bins)
    full = bins[0] > 0
    return ((bins[1][full] - bins[2][full]).abs() / bins[0][full]).max().item()


def reliability_curve(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """Per equal-width confidence bin (lo, hi]: its upper edge, the samples in it, their mean confidence and their
    accuracy (NaN for an empty bin): the data of a reliability diagram."""
    bins = calibration_bins(log_probs, labels, n_bins)
    count = bins[0]
    with torch.no_grad():
        confidence = torch.where(count > 0, bins[2] / count, torch.nan)
        accuracy = torch.where(count > 0, bins[1] / count, torch.nan)
    return {
        "upper_edge": torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:].tolist(),
        "count": count.tolist(),
        "confidence": confidence.tolist(),
        "accuracy": accuracy.tolist(),
    }


# -- temperature scaling -----------------------------------------------------------------------------------------
LOG_T_RANGE = (math.log(0.05), math.log(20.0))  # the temperatures searched


def scaled(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(log_probs / T): the predictive at temperature T (T = 1 leaves it as it is)."""
    return torch.log_softmax(log_probs.double() / temperature, dim=-1)


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T that minimises the NLL of `scaled(log_probs, T)` on these (validation) samples.

    The ensemble's predictive is scaled as a whole, its log-probabilities taken as logits (Ashukha et al., ICLR
    2020): at T = 1 it is the ensemble as reported. NLL is convex in 1/T, so a bounded scalar search over log T
    (0.05 to 20) finds the minimum; the result is reproducible to the solver's tolerance."""
    from scipy.optimize import minimize_scalar

    lp = log_probs.double()

    def loss(log_t: float) -> float:
        return -scaled(lp, math.exp(log_t)).gather(-1, labels[:, None]).mean().item()

    found = minimize_scalar(loss, bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-6})
    return math.exp(found.x)
