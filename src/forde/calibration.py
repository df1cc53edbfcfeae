"""Calibration of a predictive, as the field reports it: the expected calibration error over equal-width bins (the
paper's ECE), the Brier score, adaptive (equal-mass) and maximum calibration errors, the reliability curve, and
temperature scaling fitted on a validation split.

Inputs are log-probabilities [N, C] of the predictive (for an ensemble: `metrics.ensemble_log_probs`, the log of the
members' mean probabilities) and labels [N]; reductions in float64.
"""

from __future__ import annotations

import logging
import math

import torch


def calibration_bins(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Per confidence bin (lo, hi] of equal width: [count, sum of correct, sum of confidence], float64 [3, n_bins].

    Bins of several sets add up to the bins of their union, which is how a pooled ECE is computed
    without holding the pooled predictions."""
    probs = log_probs.double().exp()
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = torch.bucketize(conf, edges[1:-1], right=False)  # conf in (lo, hi] -> bin index
    out = torch.zeros(3, n_bins, dtype=torch.float64)
    out[0].index_add_(0, bins, torch.ones_like(conf))
    out[1].index_add_(0, bins, correct)
    out[2].index_add_(0, bins, conf)
    return out


def ece_from_bins(bins: torch.Tensor) -> float:
    """sum over bins of |accuracy - confidence| weighted by the bin's share of the samples."""
    return ((bins[1] - bins[2]).abs().sum() / bins[0].sum()).item()


def ece(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: equal-width confidence bins (lo, hi], |accuracy - confidence| weighted by bin size."""
    return ece_from_bins(calibration_bins(log_probs, labels, n_bins))


def brier(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over samples of sum_c (p_c - [c = y])^2 (0 is perfect, 2 the worst)."""
    p = log_probs.double().exp()
    onehot = torch.nn.functional.one_hot(labels, p.shape[-1]).double()
    return (p - onehot).square().sum(-1).mean().item()


def confidence_and_correct(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the predictive's top probability and whether its class is the label (1.0 or 0.0), float64."""
    conf, pred = log_probs.double().exp().max(-1)
    return conf, (pred == labels).double()


def adaptive_ece(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE over equal-mass bins: the samples sorted by confidence and split into `n_bins` bins of (nearly) equal
    size (sizes differ by at most one), each weighted by its share of the samples."""
    return adaptive_ece_of(*confidence_and_correct(log_probs, labels), n_bins)


def adaptive_ece_of(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """`adaptive_ece` from per-sample confidences and correctness (of several sets pooled, say)."""
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


def reliability_curve(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, list]:
    """Per equal-width confidence bin (lo, hi]: its upper edge, the samples in it, their mean confidence and their
    accuracy (None for an empty bin, which JSON keeps): the data of a reliability diagram."""
    count, correct, confidence = calibration_bins(log_probs, labels, n_bins).tolist()
    return {
        "upper_edge": torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:].tolist(),
        "count": count,
        "confidence": [c / n if n else None for c, n in zip(confidence, count)],
        "accuracy": [a / n if n else None for a, n in zip(correct, count)],
    }


# -- temperature scaling -----------------------------------------------------------------------------------------
log = logging.getLogger(__name__)
LOG_T_RANGE = (math.log(0.05), math.log(20.0))  # the temperatures searched


Temperature = float | torch.Tensor  # one for the ensemble's predictive, or one per member ([M])


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
    t = math.exp(found.x)
    if min(abs(found.x - b) for b in LOG_T_RANGE) < 1e-3:
        log.warning(
            "temperature scaling: T = %.3g sits at the end of the search range [%.3g, %.3g] on %d validation "
            "samples; the fit is not to be trusted (a validation split this small or this separable says little; "
            "raise data.val_fraction)",
            t,
            *(math.exp(b) for b in LOG_T_RANGE),
            len(labels),
        )
    return t


def fit_member_temperatures(member_log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One temperature per member [M], each minimising that member's own validation NLL (`fit_temperature` on
    its log-probabilities): the members are calibrated one by one, then averaged (`eval.calibrate_members`)."""
    return torch.tensor([fit_temperature(lp, labels) for lp in member_log_probs], dtype=torch.float64)
