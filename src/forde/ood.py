"""Out-of-distribution detection: scores of how in-distribution each input looks to an ensemble, and how well a
score separates an in-distribution test set (the positives) from an OOD set.

Scores, from the members' logits [M, N, C]; higher means more in-distribution:
    msp         the top probability of the ensemble's predictive (the mean of the members' softmaxes)
    max_logit   the top class of the members' mean logits
    energy      logsumexp of the members' mean logits (minus the free energy, Liu et al. 2020)
    entropy     minus the entropy of the predictive
    mi          minus the mutual information between prediction and member (the ensemble's epistemic term)

Detection metrics of a score, with the in-distribution samples as positives, computed over every distinct
threshold as scikit-learn computes them (ties broken by none):
    auroc       area under the ROC curve
    aupr_in     average precision of finding the in-distribution samples
    aupr_out    average precision of finding the OOD samples (the score negated)
    fpr95       the share of OOD samples kept at the threshold that keeps 95% of the in-distribution ones
"""

from __future__ import annotations

import math

import torch

from forde.metrics import ensemble_log_probs, entropy

SCORES = ("msp", "max_logit", "energy", "entropy", "mi")
DETECTION = ("auroc", "aupr_in", "aupr_out", "fpr95")


def ood_scores(member_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score of SCORES per sample: [M, N, C] -> {name: [N]} (float64)."""
    logits = member_logits.double()
    member_lp = torch.log_softmax(logits, -1)
    lp = ensemble_log_probs(member_lp)
    mean_logits = logits.mean(0)
    total = entropy(lp)
    return {
        "msp": lp.max(-1).values.exp(),
        "max_logit": mean_logits.max(-1).values,
        "energy": torch.logsumexp(mean_logits, -1),
        "entropy": -total,
        "mi": -(total - entropy(member_lp).mean(0)),
    }


def _curve(positives: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """True and false positives counted at every distinct threshold, from the highest score down (float64)."""
    scores = torch.cat([positives.double(), negatives.double()])
    is_positive = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
    order = torch.argsort(scores, descending=True, stable=True)
    scores, is_positive = scores[order], is_positive[order]
    last_of_each = torch.cat([torch.nonzero(scores[1:] != scores[:-1]).flatten(), torch.tensor([len(scores) - 1])])
    tp = is_positive.cumsum(0)[last_of_each]
    fp = (1 - is_positive).cumsum(0)[last_of_each]
    return tp, fp


def auroc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    tp, fp = _curve(positives, negatives)
    tpr = torch.cat([torch.zeros(1, dtype=torch.float64), tp / tp[-1]])
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), fp / fp[-1]])
    return torch.trapezoid(tpr, fpr).item()


def average_precision(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """sum over thresholds of (recall - previous recall) x precision, as scikit-learn's average_precision_score."""
    tp, fp = _curve(positives, negatives)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return (steps * precision).sum().item()


def fpr_at_tpr(positives: torch.Tensor, negatives: torch.Tensor, tpr: float = 0.95) -> float:
    """The share of negatives scored at least as high as the threshold that keeps `tpr` of the positives."""
    kept = math.ceil(tpr * len(positives) - 1e-9)  # positives that must score at or above the threshold
    threshold = torch.sort(positives.double(), descending=True).values[kept - 1]
    return (negatives.double() >= threshold).double().mean().item()


def detection_metrics(scores_in: torch.Tensor, scores_out: torch.Tensor) -> dict[str, float]:
    """DETECTION for one score on an in-distribution set (positives) and an OOD set."""
    return {
        "auroc": auroc(scores_in, scores_out),
        "aupr_in": average_precision(scores_in, scores_out),
        "aupr_out": average_precision(-scores_out, -scores_in),
        "fpr95": fpr_at_tpr(scores_in, scores_out),
    }
