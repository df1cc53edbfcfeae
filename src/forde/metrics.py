"""Metrics of the ensemble's averaged predictive, from member log-probabilities [M, N, C].

All reductions run in float64: NLL and ECE over 10,000 samples lose digits in float32.
"""

from __future__ import annotations

import math

import torch


def ensemble_log_probs(member_log_probs: torch.Tensor) -> torch.Tensor:
    """log of the mean predictive: logsumexp over members minus log M -> [N, C]."""
    lp = member_log_probs.double()
    return torch.logsumexp(lp, 0) - math.log(lp.shape[0])


def accuracy(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (log_probs.argmax(-1) == labels).double().mean().item()


def nll(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    return -log_probs.double().gather(-1, labels[:, None]).mean().item()


def ece(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: equal-width confidence bins (lo, hi], |accuracy - confidence| weighted by bin size."""
    probs = log_probs.double().exp()
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = torch.bucketize(conf, edges[1:-1], right=False)  # conf in (lo, hi] -> bin index
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    return ((acc_sum - conf_sum).abs().sum() / len(labels)).item()


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    lp = log_probs.double()
    return -(lp.exp() * lp).nan_to_num().sum(-1)  # 0 * log 0 = 0


def epistemic_uncertainty(member_log_probs: torch.Tensor) -> float:
    """Mutual information: entropy of the mean prediction minus the mean member entropy (Depeweg et al. 2018)."""
    total = entropy(ensemble_log_probs(member_log_probs))
    aleatoric = entropy(member_log_probs).mean(0)
    return (total - aleatoric).mean().item()


def member_accuracies(member_log_probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return [accuracy(lp, labels) for lp in member_log_probs]


def gradient_cosine_distance(grads: torch.Tensor) -> float:
    """Mean over samples and member pairs i < j of 1 - cos(g_ib, g_jb) for grads [M, N, D]."""
    m = grads.shape[0]
    if m < 2:
        return 0.0
    unit = torch.nn.functional.normalize(grads.double(), dim=-1)
    cos = torch.einsum("ind,jnd->ijn", unit, unit)
    i, j = torch.triu_indices(m, m, offset=1)
    return (1.0 - cos[i, j]).mean().item()


def prediction_metrics(member_log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Everything computable from predictions alone."""
    lp = ensemble_log_probs(member_log_probs)
    return {
        "accuracy": accuracy(lp, labels),
        "nll": nll(lp, labels),
        "ece": ece(lp, labels),
        "epistemic": epistemic_uncertainty(member_log_probs),
        "member_accuracy": member_accuracies(member_log_probs, labels),
    }
