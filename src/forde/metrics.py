"""Metrics of the ensemble's averaged predictive, from member log-probabilities [M, N, C].

The metrics `forde train` reports, as functions of tensors: get the member log-probabilities of a test set
(`torch.stack([m(x).log_softmax(-1) for m in members])`, batch by batch, concatenated along N) and pass them
with the labels. `ensemble_metrics` gives everything at once; `CorruptedMetrics` pools corrupted test sets
into cA / cNLL / cECE as the paper does. All reductions run in float64: NLL and ECE over 10,000 samples lose
digits in float32.
"""

from __future__ import annotations

import math

import torch

from forde.calibration import (
    Temperature,
    adaptive_ece,
    adaptive_ece_of,
    brier,
    calibration_bins,
    confidence_and_correct,
    ece,
    ece_from_bins,
    mce,
    scaled,
)
from forde.selective import augrc, augrc_of, aurc, aurc_of, errors_by_confidence


def ensemble_log_probs(member_log_probs: torch.Tensor) -> torch.Tensor:
    """The log of the ensemble's predictive, the mean of the members' probabilities: [M, N, C] -> [N, C] (float64)."""
    lp = member_log_probs.double()
    return torch.logsumexp(lp, 0) - math.log(lp.shape[0])


def calibrated_log_probs(member_log_probs: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """The ensemble's log-predictive after temperature scaling [N, C]: one temperature scales the averaged
    predictive (its log-probabilities taken as logits); one per member ([M]) scales each member's log-probabilities
    before they are averaged."""
    if isinstance(temperature, torch.Tensor):
        t = temperature.double().view(-1, *([1] * (member_log_probs.dim() - 1)))
        return ensemble_log_probs(torch.log_softmax(member_log_probs.double() / t, dim=-1))
    return scaled(ensemble_log_probs(member_log_probs), temperature)


def accuracy(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose most probable class is the label, for log-probabilities [N, C]."""
    return (log_probs.argmax(-1) == labels).double().mean().item()


def nll(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels, for log-probabilities [N, C]."""
    return -log_probs.double().gather(-1, labels[:, None]).mean().item()


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each categorical distribution along the last dim (float64)."""
    lp = log_probs.double()
    return -(lp.exp() * lp).nan_to_num().sum(-1)  # 0 * log 0 = 0


def epistemic_per_sample(member_log_probs: torch.Tensor) -> torch.Tensor:
    """Mutual information per sample: entropy of the mean prediction minus the mean member entropy -> [N]."""
    return entropy(ensemble_log_probs(member_log_probs)) - entropy(member_log_probs).mean(0)


def epistemic_uncertainty(member_log_probs: torch.Tensor) -> float:
    """Mutual information (Depeweg et al. 2018), averaged over samples."""
    return epistemic_per_sample(member_log_probs).mean().item()


def member_accuracies(member_log_probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each member's own accuracy, for member log-probabilities [M, N, C]."""
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


def predictive_metrics(lp: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """What the field reports of a predictive [N, C] (log-probabilities): accuracy, NLL, ECE (15 equal-width bins),
    Brier, adaptive ECE (15 equal-mass bins), MCE, the mean predictive entropy, and AURC / AUGRC (abstaining by
    confidence; forde.calibration, forde.selective)."""
    return {
        "accuracy": accuracy(lp, labels),
        "nll": nll(lp, labels),
        "ece": ece(lp, labels),
        "brier": brier(lp, labels),
        "adaptive_ece": adaptive_ece(lp, labels),
        "mce": mce(lp, labels),
        "entropy": entropy(lp).mean().item(),
        "aurc": aurc(lp, labels),
        "augrc": augrc(lp, labels),
    }


def prediction_metrics(member_log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Everything computable from predictions alone: the keys of `ensemble_metrics` but gradient diversity."""
    return {
        **predictive_metrics(ensemble_log_probs(member_log_probs), labels),
        "epistemic": epistemic_uncertainty(member_log_probs),
        "member_accuracy": member_accuracies(member_log_probs, labels),
    }


def ensemble_metrics(
    member_log_probs: torch.Tensor,
    labels: torch.Tensor,
    grads: torch.Tensor | None = None,
    temperature: Temperature | None = None,
) -> dict:
    """The metrics `forde train` reports for a test set.

    Args:
        member_log_probs: The members' log-probabilities `[M, N, C]` on the set's N samples.
        labels: The class labels `[N]`.
        grads: Optionally the members' input gradients `[M, n, D]` on (some of) the samples, from
            `Ensemble.input_gradients(x, y, create_graph=False).grads`.

        temperature: Optionally a temperature fitted on validation data (forde.calibration.fit_temperature), or
            one per member (`fit_member_temperatures`): the predictive's metrics at it are added under `ts/`.

    Returns:
        `predictive_metrics` of the ensemble's mean predictive (accuracy, NLL, ECE, Brier, adaptive ECE, MCE,
        entropy, AURC, AUGRC); `epistemic`, the mean mutual information; `member_accuracy`, each member's accuracy;
        with `grads` (from two members on) `grad_cosine_distance`, the gradient diversity; with a `temperature`,
        `ts/...` for each predictive metric.
    """
    metrics = prediction_metrics(member_log_probs, labels)
    if temperature is not None:
        lp = calibrated_log_probs(member_log_probs, temperature)
        metrics.update({f"ts/{k}": v for k, v in predictive_metrics(lp, labels).items()})
    if grads is not None and grads.shape[0] > 1:
        metrics["grad_cosine_distance"] = gradient_cosine_distance(grads)
    return metrics


class PredictivePool:
    """The `predictive_metrics` of several sets pooled into one, accumulated set by set: exactly those of the
    concatenated predictions (up to float64 summation order), keeping per sample only its confidence and whether
    it was right (what equal-mass bins and abstaining need), not the predictions."""

    def __init__(self, n_bins: int = 15):
        self.bins = torch.zeros(3, n_bins, dtype=torch.float64)
        self.sums = {"accuracy": 0.0, "nll": 0.0, "brier": 0.0, "entropy": 0.0}
        self.conf: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.n = 0

    def add(self, lp: torch.Tensor, labels: torch.Tensor) -> None:
        lp = lp.double()
        conf, correct = confidence_and_correct(lp, labels)
        onehot = torch.nn.functional.one_hot(labels, lp.shape[-1]).double()
        self.bins += calibration_bins(lp, labels, self.bins.shape[1])
        self.sums["accuracy"] += correct.sum().item()
        self.sums["nll"] -= lp.gather(-1, labels[:, None]).sum().item()
        self.sums["brier"] += (lp.exp() - onehot).square().sum().item()
        self.sums["entropy"] += entropy(lp).sum().item()
        self.conf.append(conf)
        self.correct.append(correct)
        self.n += len(labels)

    def result(self) -> dict[str, float]:
        if not self.n:
            return {}
        conf, correct = torch.cat(self.conf), torch.cat(self.correct)
        errors = errors_by_confidence(conf, correct)
        full = self.bins[0] > 0
        return {
            **{k: v / self.n for k, v in self.sums.items()},
            "ece": ece_from_bins(self.bins),
            "adaptive_ece": adaptive_ece_of(conf, correct, self.bins.shape[1]),
            "mce": ((self.bins[1][full] - self.bins[2][full]).abs() / self.bins[0][full]).max().item(),
            "aurc": aurc_of(errors),
            "augrc": augrc_of(errors),
        }


class PooledMetrics:
    """The metrics of several sets pooled into one, accumulated set by set: exactly the metrics of the
    concatenated predictions (up to float64 summation order), without holding them.

    Accuracy, NLL, Brier, entropy, epistemic uncertainty and gradient diversity are per-sample means, so pooling
    weights each set by its size (with sets of equal size: the mean over sets); ECE, adaptive ECE, MCE, AURC and
    AUGRC are computed on the pooled samples, which is not the mean of the sets' values. With a `temperature`,
    the predictive's metrics at that temperature too (forde.calibration), under `ts/`.
    """

    def __init__(self, n_bins: int = 15, temperature: Temperature | None = None):
        self.predictive = PredictivePool(n_bins)
        self.scaled = PredictivePool(n_bins) if temperature is not None else None
        self.temperature = temperature
        self.epistemic, self.n = 0.0, 0
        self.grad_sum, self.grad_n = 0.0, 0

    def add(self, member_log_probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.predictive.add(ensemble_log_probs(member_log_probs), labels)
        if self.scaled is not None and self.temperature is not None:
            self.scaled.add(calibrated_log_probs(member_log_probs, self.temperature), labels)
        self.epistemic += epistemic_per_sample(member_log_probs).sum().item()
        self.n += len(labels)

    def add_gradients(self, grads: torch.Tensor) -> None:
        self.grad_sum += gradient_cosine_distances(grads).sum().item()
        self.grad_n += grads.shape[1]

    def result(self) -> dict:
        out = self.predictive.result()
        if self.n:
            out["epistemic"] = self.epistemic / self.n
        if self.grad_n:
            out["grad_cosine_distance"] = self.grad_sum / self.grad_n
        if self.scaled is not None:
            out.update({f"ts/{k}": v for k, v in self.scaled.result().items()})
        return out


SEVERITY_GROUPS = {"severity_1-3": (1, 2, 3), "severity_4-5": (4, 5)}


def summarize_corrupted(per_set: list[dict], pooled: dict[int, dict]) -> dict:
    """cA / cNLL / cECE as the paper's release computes them, per severity and over severities.

    `pooled[k]` holds the metrics of severity k's corruption types pooled into one set; `all` and the
    groups of severities (1-3, 4-5) average those over their severities. `ece_set_mean` is the mean of
    the per-set ECEs instead (higher: the ECE of a pooled set is at most the mean of its parts' ECEs).
    Accuracy, NLL, epistemic uncertainty and gradient diversity of the pool equal the mean over its
    sets, as the sets have equal sizes.
    """

    def group(severities) -> dict:
        levels = [pooled[k] for k in severities if k in pooled]
        if not levels:
            return {}
        out = {key: sum(p[key] for p in levels) / len(levels) for key in levels[0] if all(key in p for p in levels)}
        eces = [r["ece"] for r in per_set if r["severity"] in severities]
        return {**out, "ece_set_mean": sum(eces) / len(eces)}

    summary = {"all": group(sorted(pooled))}
    summary.update({f"severity_{k}": group((k,)) for k in sorted(pooled)})
    summary.update({name: group(sevs) for name, sevs in SEVERITY_GROUPS.items() if any(k in pooled for k in sevs)})
    return summary


class CorruptedMetrics:
    """The corrupted-data metrics (cA, cNLL, cECE), added set by set, as `forde train` computes them.

    Add each corrupted test set (one corruption at one severity) with `add`; `summary()` then pools each
    severity's sets into one set and averages over severities, as the paper's release does. Only per-bin
    counts and sums are kept, not the predictions.

    Examples:
        >>> corrupted = CorruptedMetrics()
        >>> for name, severity, log_probs, labels in my_corrupted_sets:  # doctest: +SKIP
        ...     corrupted.add(name, severity, log_probs, labels)
        >>> corrupted.summary()["all"]["accuracy"]  # doctest: +SKIP
    """

    def __init__(self, n_bins: int = 15, temperature: Temperature | None = None):
        self.n_bins, self.temperature = n_bins, temperature
        self.per_set: list[dict] = []
        self.pools: dict[int, PooledMetrics] = {}

    def add(
        self,
        corruption: str,
        severity: int,
        member_log_probs: torch.Tensor,
        labels: torch.Tensor,
        grads: torch.Tensor | None = None,
        **info,
    ) -> dict:
        """Add one corrupted set and return its own metrics.

        Args:
            corruption: The corruption's name, e.g. `"gaussian_noise"`.
            severity: Its severity, 1 to 5.
            member_log_probs: The members' log-probabilities `[M, N, C]` on the set.
            labels: The class labels `[N]`.
            grads: Optionally the members' input gradients `[M, n, D]` on (some of) the set's samples.
            **info: Further fields for the set's row (e.g. where the set came from).

        Returns:
            The set's row, also kept in `per_set`: its name, severity, `info` and the `ensemble_metrics`
            but `member_accuracy`.
        """
        row = {
            "corruption": corruption,
            "severity": severity,
            **info,
            **ensemble_metrics(member_log_probs, labels, grads, self.temperature),
        }
        row.pop("member_accuracy")
        pool = self.pools.setdefault(severity, PooledMetrics(self.n_bins, self.temperature))
        pool.add(member_log_probs, labels)
        if grads is not None and "grad_cosine_distance" in row:
            pool.add_gradients(grads)
        self.per_set.append(row)
        return row

    def summary(self) -> dict:
        """`all`, `severity_k` for each severity added, and `severity_1-3` / `severity_4-5`: each a dict of the
        pooled `accuracy`, `nll`, `ece`, `epistemic` (and `grad_cosine_distance`) plus `ece_set_mean`, the mean
        of the sets' own ECEs. `summary()["all"]` holds cA, cNLL and cECE. Empty before any set is added."""
        if not self.per_set:
            return {}
        return summarize_corrupted(self.per_set, {k: p.result() for k, p in self.pools.items()})
