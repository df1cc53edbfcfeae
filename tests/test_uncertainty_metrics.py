"""Calibration, selective prediction and OOD detection metrics against independent implementations: scikit-learn's
ROC and precision-recall, torchmetrics' calibration errors, and float64 brute force written out sample by sample."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics.classification import MulticlassCalibrationError

from forde.calibration import adaptive_ece, brier, fit_temperature, mce, reliability_curve, scaled
from forde.metrics import ensemble_log_probs, entropy
from forde.ood import SCORES, detection_metrics, ood_scores
from forde.selective import augrc, aurc, risk_coverage_curve


def predictions(n: int = 500, c: int = 7, seed: int = 0, sharpness: float = 3.0, m: int = 1):
    """Member logits [m, n, c], the predictive's log-probabilities [n, c] and labels [n], somewhat calibrated."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, n, c, generator=g, dtype=torch.float64) * sharpness
    probs = torch.softmax(logits.mean(0), -1)
    labels = torch.multinomial(probs, 1, generator=g).flatten()
    flip = torch.rand(n, generator=g) < 0.2
    labels[flip] = torch.randint(0, c, (int(flip.sum()),), generator=g)
    return logits, ensemble_log_probs(torch.log_softmax(logits, -1)), labels


def test_brier_is_the_squared_distance_to_the_one_hot_label():
    _, lp, y = predictions()
    p = lp.exp().numpy()
    want = np.mean([sum((p[i, k] - float(k == y[i].item())) ** 2 for k in range(p.shape[1])) for i in range(len(y))])
    assert brier(lp, y) == pytest.approx(want, rel=1e-12)


def test_maximum_calibration_error_matches_torchmetrics():
    _, lp, y = predictions()
    want = MulticlassCalibrationError(num_classes=7, n_bins=15, norm="max")(lp.exp().float(), y).item()
    assert mce(lp, y) == pytest.approx(want, abs=1e-6)  # torchmetrics in float32


def test_adaptive_ece_over_equal_mass_bins_by_brute_force():
    _, lp, y = predictions(n=503)
    conf, pred = lp.exp().max(-1)
    ranked = sorted(range(503), key=lambda i: (conf[i].item(), i))
    sizes = [503 // 15 + (b < 503 % 15) for b in range(15)]  # equal to within one sample, the larger first
    total, start = 0.0, 0
    for size in sizes:
        part = ranked[start : start + size]
        start += size
        acc = sum(float(pred[i] == y[i]) for i in part) / size
        mean_conf = sum(conf[i].item() for i in part) / size
        total += size * abs(acc - mean_conf)
    assert adaptive_ece(lp, y) == pytest.approx(total / 503, rel=1e-12)


def test_the_reliability_curve_holds_each_bin_s_confidence_accuracy_and_count():
    _, lp, y = predictions()
    curve = reliability_curve(lp, y, n_bins=10)
    conf, pred = lp.exp().max(-1)
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inside = (conf > lo) & (conf <= hi)
        assert curve["count"][b] == inside.sum().item()
        if inside.any():
            assert curve["confidence"][b] == pytest.approx(conf[inside].mean().item(), rel=1e-12)
            assert curve["accuracy"][b] == pytest.approx((pred == y)[inside].double().mean().item(), rel=1e-12)
        else:
            assert curve["accuracy"][b] is None and curve["confidence"][b] is None


def risks_by_brute_force(lp, y):
    conf, pred = lp.exp().max(-1)
    ranked = sorted(range(len(y)), key=lambda i: (-conf[i].item(), i))
    errors, risks, generalized = 0, [], []
    for k, i in enumerate(ranked, start=1):
        errors += int(pred[i] != y[i])
        risks.append(errors / k)
        generalized.append(errors / len(y))
    return risks, generalized


def test_aurc_and_augrc_by_brute_force():
    _, lp, y = predictions()
    risks, generalized = risks_by_brute_force(lp, y)
    assert aurc(lp, y) == pytest.approx(np.mean(risks), rel=1e-12)
    assert augrc(lp, y) == pytest.approx(np.mean(generalized), rel=1e-12)
    curve = risk_coverage_curve(lp, y, points=11)
    assert curve["coverage"][-1] == 1.0 and curve["risk"][-1] == pytest.approx(risks[-1])
    for coverage, risk in zip(curve["coverage"], curve["risk"]):
        assert risk == pytest.approx(risks[round(coverage * len(y)) - 1])


def test_a_perfect_abstainer_has_the_least_area():
    _, lp, y = predictions()
    wrong = lp.argmax(-1) != y
    uniform = torch.full_like(lp, -math.log(lp.shape[1]))
    honest = torch.where(wrong[:, None], uniform, lp)  # unsure exactly where it errs
    assert aurc(honest, y) < aurc(lp, y) and augrc(honest, y) < augrc(lp, y)


@pytest.mark.parametrize("ties", [False, True])
def test_detection_metrics_match_scikit_learn(ties):
    g = torch.Generator().manual_seed(1)
    scores_in = torch.randn(400, generator=g, dtype=torch.float64) + 1.0
    scores_out = torch.randn(300, generator=g, dtype=torch.float64)
    if ties:  # a coarse score (a top probability of 1.0 for many samples, say)
        scores_in, scores_out = scores_in.round(decimals=1), scores_out.round(decimals=1)
    y = np.r_[np.ones(400), np.zeros(300)]
    s = np.r_[scores_in.numpy(), scores_out.numpy()]
    got = detection_metrics(scores_in, scores_out)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert got["aupr_in"] == pytest.approx(average_precision_score(y, s), rel=1e-12)
    assert got["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), rel=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert got["fpr95"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95, side="left")], rel=1e-12)


def test_ood_scores_by_their_definitions():
    logits, lp, _ = predictions(n=50, m=4)
    scores = ood_scores(logits)
    assert set(scores) == set(SCORES)
    probs = torch.softmax(logits, -1)
    mean_probs = probs.mean(0)
    torch.testing.assert_close(scores["msp"], mean_probs.max(-1).values)
    torch.testing.assert_close(scores["max_logit"], logits.mean(0).max(-1).values)
    torch.testing.assert_close(scores["energy"], torch.log(torch.exp(logits.mean(0)).sum(-1)))
    h = -(mean_probs * mean_probs.log()).sum(-1)
    torch.testing.assert_close(scores["entropy"], -h)
    member_h = -(probs * probs.log()).sum(-1).mean(0)
    torch.testing.assert_close(scores["mi"], -(h - member_h))
    assert (scores["mi"] <= 1e-12).all()  # mutual information is non-negative


def test_the_fitted_temperature_minimises_validation_nll():
    _, lp, y = predictions(sharpness=6.0)  # over-confident: the best temperature is above 1
    t = fit_temperature(lp, y)

    def nll(temp):
        return -scaled(lp, temp).gather(-1, y[:, None]).mean().item()

    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 4001))
    best = grid[np.argmin([nll(v) for v in grid])]
    assert t > 1 and t == pytest.approx(best, rel=2e-3) and nll(t) <= nll(best) + 1e-9
    assert torch.allclose(scaled(lp, 1.0), lp) and entropy(scaled(lp, t)).mean() > entropy(lp).mean()


def test_a_temperature_at_the_end_of_its_range_is_reported(caplog):
    """One confidently wrong validation sample: the NLL falls as T grows, so the fit stops at the range's end."""
    from forde.calibration import fit_temperature

    t = fit_temperature(torch.tensor([[0.0, -5.0]]).log_softmax(-1), torch.tensor([1]))
    assert t == pytest.approx(20.0, rel=1e-3)
    assert "sits at the end of the search range" in caplog.text and "on 1 validation samples" in caplog.text


def test_per_member_temperatures_scale_each_member_before_the_average():
    """calibrated_log_probs against the average written out member by member; fit_member_temperatures against each
    member's own fit; one temperature scales the averaged predictive as `scaled` does."""
    from forde.calibration import fit_member_temperatures
    from forde.metrics import calibrated_log_probs

    logits, lp, y = predictions(m=3, sharpness=5.0)
    member_lp = torch.log_softmax(logits, -1)
    temps = torch.tensor([0.7, 1.0, 2.5], dtype=torch.float64)
    want = sum(torch.softmax(member_lp[i] / temps[i], -1) for i in range(3)) / 3
    torch.testing.assert_close(calibrated_log_probs(member_lp, temps).exp(), want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(calibrated_log_probs(member_lp, 1.3), scaled(lp, 1.3))
    fitted = fit_member_temperatures(member_lp, y)
    assert fitted.shape == (3,) and fitted.tolist() == [fit_temperature(member_lp[i], y) for i in range(3)]
