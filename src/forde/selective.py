"""Selective prediction: how good a predictive is at abstaining, when it keeps only the samples it is most confident
about. The samples are ranked by confidence (the predictive's top probability), most confident first; keeping the
first k of N covers k / N of them.

    risk(k)              errors among the first k / k              (the risk-coverage curve, Geifman et al. 2017)
    generalized risk(k)  errors among the first k / N              (Traub et al., NeurIPS 2024)
    AURC                 mean over k = 1..N of risk(k)
    AUGRC                mean over k = 1..N of generalized risk(k)

Ties in confidence are ranked by the samples' order (a stable sort): any order of tied samples is as justified.
"""

from __future__ import annotations

import torch


def errors_by_confidence(conf: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Cumulative errors among the k most confident samples, k = 1..N (float64), from per-sample confidences and
    correctness (forde.calibration.confidence_and_correct)."""
    order = torch.argsort(conf, descending=True, stable=True)
    return (1.0 - correct[order].double()).cumsum(0)


def _errors(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from forde.calibration import confidence_and_correct

    return errors_by_confidence(*confidence_and_correct(log_probs, labels))


def aurc_of(errors: torch.Tensor) -> float:
    return (errors / torch.arange(1, len(errors) + 1, dtype=torch.float64)).mean().item()


def augrc_of(errors: torch.Tensor) -> float:
    return (errors / len(errors)).mean().item()


def aurc(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve (lower is better)."""
    return aurc_of(_errors(log_probs, labels))


def augrc(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the generalized risk-coverage curve (lower is better)."""
    return augrc_of(_errors(log_probs, labels))


def risk_coverage_curve(log_probs: torch.Tensor, labels: torch.Tensor, points: int = 101) -> dict[str, list[float]]:
    """The risk at `points` coverages spread evenly over (0, 1] (each rounded up to whole samples): what a figure
    needs, a fixed size whatever N."""
    errors = _errors(log_probs, labels)
    n = len(errors)
    kept = torch.unique(torch.ceil(torch.linspace(1 / points, 1, points, dtype=torch.float64) * n).long().clamp(1, n))
    return {"coverage": (kept.double() / n).tolist(), "risk": (errors[kept - 1] / kept.double()).tolist()}
