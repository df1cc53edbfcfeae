"""The illustrative experiments: their data, the paper's Fig. 3 claim on numbers, and the script's outputs."""

import dataclasses
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from forde.illustrative import diagram
from forde.illustrative.data import pentagon_clusters, regression_1d, regression_features
from forde.illustrative.diagram import kernel_and_push
from forde.illustrative.experiment import CLASSIFICATION, METHODS, run_classification
from forde.kernels import unit_normalize

SCRIPT = Path(__file__).resolve().parents[1] / "analysis" / "illustrative.py"


@pytest.fixture
def one_thread():
    """Tiny networks: intra-op threads only add overhead (and contention on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_regression_data_is_three_clusters_with_gaps():
    x, y = regression_1d()
    assert x.shape == y.shape == (400,)
    inside = ((x > -7.3) & (x < -4.7)) | ((x > -1.3) & (x < 1.3)) | ((x > 4.7) & (x < 7.3))
    assert inside.all()
    torch.testing.assert_close(regression_features(torch.tensor([2.0])), torch.tensor([[1.0, 1.0]]))


def test_pentagon_clusters_sit_on_a_regular_pentagon():
    x, y = pentagon_clusters(n_per_class=2000, seed=1)
    centres = torch.stack([x[y == k].mean(0) for k in range(5)])
    torch.testing.assert_close(centres.norm(dim=1), torch.full((5,), 5.0, dtype=torch.float64), atol=0.1, rtol=0)
    torch.testing.assert_close(centres[0], torch.tensor([0.0, 5.0], dtype=torch.float64), atol=0.1, rtol=0)
    sides = (centres - centres.roll(1, 0)).norm(dim=1)
    torch.testing.assert_close(
        sides, torch.full((5,), 2 * 5.0 * math.sin(math.pi / 5), dtype=torch.float64), atol=0.15, rtol=0
    )


def test_forde_is_more_uncertain_than_de_away_from_the_data(one_thread):
    """Fig. 3's claim: same seed, same members at initialisation, same budget; FoRDE's predictive
    entropy away from the training clusters is clearly higher, while both fit the training data."""
    cfg = dataclasses.replace(CLASSIFICATION, members=6, steps=400, hidden=(32, 32), grid=40, methods=("de", "forde"))
    panels, _ = run_classification(cfg)
    de, forde = panels["de"], panels["forde"]
    assert de.fit >= 0.98 and forde.fit >= 0.98
    assert forde.score > 1.5 * de.score, (forde.score, de.score)


def test_script_writes_figures_and_numbers(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "illustrative"
    monkeypatch.setattr(sys, "argv", ["illustrative.py", "--out", str(out), "--members", "3", "--steps", "15"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code == 0
    for task in ("regression", "classification"):
        for ext in ("png", "pdf"):
            assert (out / f"illustrative_{task}.{ext}").stat().st_size > 0
    numbers = json.loads((out / "illustrative_numbers.json").read_text())
    for task in ("regression", "classification"):
        assert set(numbers[task]["methods"]) == set(METHODS)
        assert all(v["score"] >= 0 for v in numbers[task]["methods"].values())
    table = (out / "illustrative_numbers.md").read_text()
    assert "| FoRDE |" in table and "away from the data" in table


def test_the_diagrams_repulsion_is_minus_the_gradient_of_the_kernel_sum():
    """The push drawn on each unit gradient, against central differences of sum_i log sum_j k_ij with the j side
    (and the bandwidth) held at their values: float64, a random PCA-like metric."""
    torch.manual_seed(0)
    s = unit_normalize(torch.randn(3, 2, dtype=torch.float64), eps=1e-12)
    basis = torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64)).Q
    weights = torch.tensor([0.4, 1.6], dtype=torch.float64)
    k, push = kernel_and_push(s, weights, basis)
    z = s @ basis * weights.sqrt()
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    h = d.flatten().median() / math.log(3)  # 9 distances: the middle one
    assert torch.allclose(k, torch.exp(-d / h))

    def objective(moved: torch.Tensor) -> float:
        zi = moved @ basis * weights.sqrt()
        return float(torch.log(torch.exp(-((zi - z) ** 2).sum(-1) / h).sum()))

    for i in range(3):
        for axis in range(2):
            step = torch.zeros(2, dtype=torch.float64)
            step[axis] = 1e-6
            numeric = (objective(s[i] + step) - objective(s[i] - step)) / 2e-6
            assert push[i, axis].item() == pytest.approx(-numeric, rel=1e-5, abs=1e-9)


def test_the_method_diagram_script_writes_its_figure(tmp_path, one_thread):
    assert diagram.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "method-diagram.png").stat().st_size > 10_000
