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


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    lp = log_probs.double()
    return -(lp.exp() * lp).nan_to_num().sum(-1)  # 0 * log 0 = 0


def epistemic_per_sample(member_log_probs: torch.Tensor) -> torch.Tensor:
    """Mutual information per sample: entropy of the mean prediction minus the mean member entropy -> [N]."""
    return entropy(ensemble_log_probs(member_log_probs)) - entropy(member_log_probs).mean(0)


def epistemic_uncertainty(member_log_probs: torch.Tensor) -> float:
    """Mutual information (Depeweg et al. 2018), averaged over samples."""
    return epistemic_per_sample(member_log_probs).mean().item()


def member_accuracies(member_log_probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return [accuracy(lp, labels) for lp in member_log_probs]


def gradient_cosine_distances(grads: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean over member pairs i < j of 1 - cos(g_ib, g_jb), for grads [M, N, D] -> [N] (float64)."""
    m = grads.shape[0]
    if m < 2:
        return grads.new_zeros(grads.shape[1], dtype=torch.float64)
    unit = torch.nn.functional.normalize(grads.double(), dim=-1)
    cos = torch.einsum("ind,jnd->ijn", unit, unit)
    i, j = torch.triu_indices(m, m, offset=1)
    return (1.0 - cos[i, j]).mean(0)


def gradient_cosine_distance(grads: torch.Tensor) -> float:
    """Mean over samples and member pairs i < j of 1 - cos(g_ib, g_jb) for grads [M, N, D]."""
    return gradient_cosine_distances(grads).mean().item()


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


class PooledMetrics:
    """The metrics of several sets pooled into one, accumulated set by set: exactly the metrics of the
    concatenated predictions (up to float64 summation order), without holding them.

    Accuracy, NLL, epistemic uncertainty and gradient diversity are per-sample means, so pooling weights
    each set by its size (with sets of equal size: the mean over sets); ECE is computed on the pooled
    calibration bins, which is not the mean of the sets' ECEs (it is at most that mean).
    """

    def __init__(self, n_bins: int = 15):
        self.bins = torch.zeros(3, n_bins, dtype=torch.float64)
        self.sums = {"accuracy": 0.0, "nll": 0.0, "epistemic": 0.0}
        self.n = 0
        self.grad_sum, self.grad_n = 0.0, 0

    def add(self, member_log_probs: torch.Tensor, labels: torch.Tensor) -> None:
        lp = ensemble_log_probs(member_log_probs)
        self.bins += calibration_bins(lp, labels, self.bins.shape[1])
        self.sums["accuracy"] += (lp.argmax(-1) == labels).double().sum().item()
        self.sums["nll"] -= lp.gather(-1, labels[:, None]).sum().item()
        self.sums["epistemic"] += epistemic_per_sample(member_log_probs).sum().item()
        self.n += len(labels)

    def add_gradients(self, grads: torch.Tensor) -> None:
        self.grad_sum += gradient_cosine_distances(grads).sum().item()
        self.grad_n += grads.shape[1]

    def result(self) -> dict:
        out = {k: v / self.n for k, v in self.sums.items()} if self.n else {}
        if self.n:
            out["ece"] = ece_from_bins(self.bins)
        if self.grad_n:
            out["grad_cosine_distance"] = self.grad_sum / self.grad_n
        return out
