"""Metrics against hand-computed values on small fixed examples, and against torchmetrics."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from forde.metrics import (
    PooledMetrics,
    accuracy,
    ece,
    ensemble_log_probs,
    epistemic_uncertainty,
    gradient_cosine_distance,
    member_accuracies,
    nll,
    prediction_metrics,
)


def lp(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_ensemble_predictive_is_mean_of_member_probabilities():
    members = torch.stack([lp([[0.9, 0.1], [0.2, 0.8]]), lp([[0.5, 0.5], [0.6, 0.4]])])
    torch.testing.assert_close(
        ensemble_log_probs(members).exp(), torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=torch.float64)
    )


def test_accuracy_and_nll_by_hand():
    probs = lp([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1])
    assert accuracy(probs, labels) == pytest.approx(2 / 3)
    assert nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.9)) / 3)


def test_ece_by_hand():
    # confidences 0.95 (correct), 0.95 (wrong), 0.6 (correct), 0.55 (wrong)
    probs = lp([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.45, 0.55]])
    labels = torch.tensor([0, 0, 0, 0])
    # bins of width 1/15: 0.95 -> (14/15, 1], 0.6 -> (8/15, 9/15], 0.55 -> (8/15, 9/15]
    expected = (2 / 4) * abs(0.5 - 0.95) + (2 / 4) * abs(0.5 - (0.6 + 0.55) / 2)
    assert ece(probs, labels) == pytest.approx(expected)
    # perfectly calibrated: confidence 1 everywhere and always right
    assert ece(lp([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == pytest.approx(0.0)


def test_ece_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5000, 10, generator=g) * 3
    labels = torch.randint(0, 10, (5000,), generator=g)
    ours = ece(logits.log_softmax(-1), labels)
    theirs = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(logits.softmax(-1), labels).item()
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_epistemic_uncertainty_by_hand():
    members = torch.stack([lp([[1.0, 0.0]]), lp([[0.0, 1.0]])])  # confident and disagreeing: MI = ln 2
    assert epistemic_uncertainty(members) == pytest.approx(math.log(2))
    agree = torch.stack([lp([[0.3, 0.7]]), lp([[0.3, 0.7]])])  # identical members: no epistemic part
    assert epistemic_uncertainty(agree) == pytest.approx(0.0, abs=1e-12)
    mixed = torch.stack([lp([[0.5, 0.5]]), lp([[0.9, 0.1]])])

    def h(p):
        return -sum(q * math.log(q) for q in p)

    assert epistemic_uncertainty(mixed) == pytest.approx(h([0.7, 0.3]) - (h([0.5, 0.5]) + h([0.9, 0.1])) / 2)


def test_gradient_cosine_distance_by_hand():
    g = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[-3.0, 0.0]]])  # pairs: orthogonal, opposite, orthogonal
    assert gradient_cosine_distance(g) == pytest.approx((1 + 2 + 1) / 3)
    same = torch.tensor([[[1.0, 2.0], [3.0, 1.0]], [[2.0, 4.0], [6.0, 2.0]]])
    assert gradient_cosine_distance(same) == pytest.approx(0.0, abs=1e-12)
    assert gradient_cosine_distance(g[:1]) == 0.0


def test_member_accuracies_and_bundle():
    members = torch.stack([lp([[0.9, 0.1], [0.8, 0.2]]), lp([[0.2, 0.8], [0.3, 0.7]])])
    labels = torch.tensor([0, 1])
    assert member_accuracies(members, labels) == [0.5, 0.5]
    out = prediction_metrics(members, labels)
    assert set(out) == {
        *("accuracy", "nll", "ece", "brier", "adaptive_ece", "mce", "entropy", "aurc", "augrc"),
        *("epistemic", "member_accuracy"),
    }
    assert out["accuracy"] == pytest.approx(0.5)


def members_with(conf: torch.Tensor, pred: torch.Tensor, classes: int = 3, m: int = 2) -> torch.Tensor:
    """M identical members predicting class `pred` with probability `conf` (the rest spread evenly)."""
    probs = ((1 - conf) / (classes - 1))[:, None].repeat(1, classes).double()
    probs[torch.arange(len(pred)), pred] = conf.double()
    return probs.log().expand(m, -1, -1)


def test_pooled_ece_is_the_ece_of_the_pool_not_the_mean_of_the_sets():
    """Two sets at confidence 0.9: one always right (ECE 0.1), one right 80% of the time (ECE 0.1). Pooled,
    the 0.9 bin is right 90% of the time: ECE 0, while the mean of the per-set ECEs is 0.1."""
    n = 10
    conf = torch.full((n,), 0.9, dtype=torch.float64)
    labels = torch.zeros(n, dtype=torch.long)
    sets = [
        (members_with(conf, torch.zeros(n, dtype=torch.long)), labels),
        (members_with(conf, torch.tensor([0] * 8 + [1, 2])), labels),
    ]
    per_set = [ece(ensemble_log_probs(lp), y) for lp, y in sets]
    assert per_set == pytest.approx([0.1, 0.1])
    pool = PooledMetrics()
    for lp, y in sets:
        pool.add(lp, y)
    assert pool.result()["ece"] == pytest.approx(0.0, abs=1e-12)
    assert pool.result()["accuracy"] == pytest.approx(0.9)


def test_pooled_metrics_match_the_concatenated_predictions():
    """Random predictions of 3 members on 4 sets: every pooled metric equals the metric of the concatenated
    sets (brute force), and for equal-size sets accuracy, NLL, epistemic and gradient diversity are the
    means over the sets, while the pooled ECE is below the mean of the sets' ECEs."""
    g = torch.Generator().manual_seed(0)
    sets = []
    for k in range(4):
        logits = torch.randn(3, 500, 10, generator=g) * 2
        labels = torch.randint(0, 10, (500,), generator=g)
        if k < 2:  # always right: under-confident sets, beside the over-confident random ones
            labels = logits.softmax(-1).mean(0).argmax(-1)
        sets.append((logits.log_softmax(-1), labels, torch.randn(3, 50, 7, generator=g)))
    pool = PooledMetrics()
    for lp, y, grads in sets:
        pool.add(lp, y)
        pool.add_gradients(grads)
    pooled = pool.result()
    brute = prediction_metrics(torch.cat([lp for lp, _, _ in sets], 1), torch.cat([y for _, y, _ in sets]))
    for key in ("accuracy", "nll", "ece", "epistemic"):
        assert pooled[key] == pytest.approx(brute[key], rel=1e-12, abs=1e-14)
    assert pooled["grad_cosine_distance"] == pytest.approx(
        gradient_cosine_distance(torch.cat([gr for _, _, gr in sets], 1))
    )
    each = [prediction_metrics(lp, y) for lp, y, _ in sets]
    for key in ("accuracy", "nll", "epistemic"):
        assert pooled[key] == pytest.approx(sum(e[key] for e in each) / 4, rel=1e-12)
    assert pooled["ece"] < sum(e["ece"] for e in each) / 4 - 0.01
