"""The report's figures on a study shaped like paper_lite_cifar10, written without training (5 methods, 3 seeds,
DE and FoRDE-PCA at 5, 19 corruptions x 5 severities, its grid over seeds in an Optuna study.db): what each figure
must show and that its text fits. `python tests/test_report_figures.py OUT` writes that study to OUT for a look."""

from __future__ import annotations

import random
import sys
import warnings
from pathlib import Path

from forde.data.corruption_names import CORRUPTIONS
from test_report_tables import write_run

SEVERITIES = (1, 2, 3, 4, 5)


def full_summary(
    accuracy: float, nll: float, ece: float, drop: float, diversity: float, epistemic: float, rng: random.Random
) -> tuple[dict, list[dict]]:
    """A summary and per-set rows with corrupted results that fall with severity, as a trained ensemble's do."""
    summary = {"test/accuracy": accuracy, "test/nll": nll, "test/ece": ece}
    summary.update({"test/grad_cosine_distance": diversity, "test/epistemic": epistemic})
    per_set = []
    for k in SEVERITIES:
        rows = [
            {
                "corruption": c,
                "severity": k,
                "source": "generated",
                "accuracy": max(0.05, accuracy - drop * k * (0.5 + (i % 7) / 6) + rng.gauss(0, 0.01)),
                "nll": nll + 0.08 * k * (0.5 + (i % 5) / 4) + rng.gauss(0, 0.01),
                "ece": max(0.0, ece - 0.005 * k + rng.gauss(0, 0.005)),
            }
            for i, c in enumerate(CORRUPTIONS)
        ]
        per_set += rows
        mean = {m: sum(r[m] for r in rows) / len(rows) for m in ("accuracy", "nll", "ece")}
        summary.update({f"corrupted/severity_{k}/{m}": v for m, v in mean.items()})
        summary[f"corrupted/severity_{k}/grad_cosine_distance"] = diversity + 0.002 * k
        summary[f"corrupted/severity_{k}/epistemic"] = epistemic * (1 + 0.1 * k)
    for group, ks in (("", SEVERITIES), ("/severity_1-3", (1, 2, 3)), ("/severity_4-5", (4, 5))):
        for m in ("accuracy", "nll", "ece"):
            summary[f"corrupted{group}/{m}"] = sum(summary[f"corrupted/severity_{k}/{m}"] for k in ks) / len(ks)
    summary["corrupted/ece_set_mean"] = summary["corrupted/ece"] + 0.01
    summary["corrupted/regenerated_sets"] = len(per_set)
    return summary, per_set


# variant -> (method, alpha, seeds, clean accuracy, NLL, ECE, accuracy lost per severity, gradient diversity, epistemic)
PAPER_LITE = {
    "DE": ("de", None, 5, 0.541, 1.267, 0.052, 0.022, 0.55, 0.041),
    "LIT": ("lit", None, 3, 0.541, 1.270, 0.060, 0.027, 0.99, 0.060),
    "FoRDE-Identity": ("forde", 0.0, 3, 0.541, 1.278, 0.058, 0.023, 0.57, 0.041),
    "FoRDE-Tuned (α=0.2)": ("forde", 0.2, 3, 0.544, 1.277, 0.061, 0.023, 0.56, 0.042),
    "FoRDE-PCA": ("forde", 1.0, 5, 0.533, 1.283, 0.057, 0.023, 0.55, 0.040),
}


def paper_lite_study(out: Path) -> Path:
    """OUT/runs/trial-NNNN (the grid: seeds 0-2 in the outer loop) and OUT/extra (seeds 3 and 4 of DE and
    FoRDE-PCA), plus the grid's Optuna study in OUT/study.db: what the shipped study leaves behind."""
    import optuna

    rng = random.Random(0)
    grid = [(v, s) for s in range(3) for v in PAPER_LITE] + [(v, s) for s in (3, 4) for v in ("FoRDE-PCA", "DE")]
    storage = f"sqlite:///{out / 'study.db'}"
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optuna.create_study(study_name="paper_lite_cifar10", storage=storage, direction="maximize")
        opt.set_metric_names(["corrupted/accuracy"])
    for number, (variant, seed) in enumerate(grid):
        method, alpha, _, acc, nll, ece, drop, diversity, epistemic = PAPER_LITE[variant]
        noise = rng.gauss(0, 0.012)
        summary, per_set = full_summary(
            acc + noise,
            nll - noise / 2 + rng.gauss(0, 0.01),
            ece + rng.gauss(0, 0.008),
            drop,
            diversity + rng.gauss(0, 0.01),
            epistemic + rng.gauss(0, 0.003),
            rng,
        )
        folder, name = (out / "runs", f"trial-{number:04d}") if seed < 3 else (out / "extra", f"{method}-s{seed}")
        run = write_run(folder, name, method, seed, summary, alpha, per_set)
        if seed < 3:
            params = {"method.name": method, "seed": seed} | ({"method.alpha": alpha} if method == "forde" else {})
            dists = {
                "method.name": optuna.distributions.CategoricalDistribution(["de", "forde", "lit"]),
                "seed": optuna.distributions.CategoricalDistribution([0, 1, 2]),
                "method.alpha": optuna.distributions.CategoricalDistribution([0.0, 0.2, 1.0]),
            }
            opt.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions={k: dists[k] for k in params},
                    value=summary["corrupted/accuracy"],
                    user_attrs={"run_dir": str(run)},
                )
            )
    return out


if __name__ == "__main__":
    print(paper_lite_study(Path(sys.argv[1])))


# ---------------------------------------------------------------------------------------------------------------
# What the figures must show, on that study

import colorsys  # noqa: E402
import statistics  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex, to_rgb  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from forde.analysis import figures  # noqa: E402
from forde.analysis.aggregate import setting_of  # noqa: E402
from forde.analysis.results import study_runs  # noqa: E402
from forde.analysis.study_figures import Objective, importance_figure, parallel_figure  # noqa: E402
from forde.analysis.tables import benchmark_table  # noqa: E402
from forde.analysis.variants import MARKERS, color  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return paper_lite_study(tmp_path_factory.mktemp("paper_lite"))


@pytest.fixture(scope="module")
def runs(study):
    return study_runs(study)


def texts(fig) -> list[Text]:
    fig.canvas.draw()
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]


def assert_fits(fig) -> None:
    """Every text of one of our figures lies inside the figure's width (a suptitle wider than the figure is cut or
    shrinks everything else when saved)."""
    fig.canvas.draw()
    legends = [t for legend in fig.legends for t in legend.get_texts()]
    for t in [fig.get_suptitle() and fig._suptitle, *fig.texts, *legends, *(ax.title for ax in fig.axes)]:
        if not t or not t.get_visible() or not t.get_text():
            continue
        box = t.get_window_extent()
        assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, f"{t.get_text()!r} is wider than the figure"


def hue(colour: str) -> float | None:
    """Degrees on the colour wheel; None for black, white and greys."""
    h, _, s = colorsys.rgb_to_hls(*to_rgb(colour))
    return None if s < 0.15 or max(to_rgb(colour)) < 0.1 else h * 360


def test_every_method_has_a_hue_of_its_own_and_keeps_it_in_every_figure(runs):
    variants = ["DE", "Weight-RDE", "Function-RDE", "LIT", "FoRDE-Identity", "FoRDE-Tuned (α=0.2)", "FoRDE-PCA"]
    hues = {v: hue(color(v)) for v in variants}
    assert sum(h is None for h in hues.values()) <= 1  # at most one method (the baseline) without a hue
    coloured = [(v, h) for v, h in hues.items() if h is not None]
    for i, (a, ha) in enumerate(coloured):
        for b, hb in coloured[i + 1 :]:
            assert min(abs(ha - hb), 360 - abs(ha - hb)) >= 12, f"{a} and {b} share a hue"
    assert hue(color("FoRDE-Tuned (α=0.4)")) == pytest.approx(hues["FoRDE-Tuned (α=0.2)"], abs=2)  # shades of one hue
    setting = setting_of(runs[0])
    for draw in (figures.severity_figure, figures.corruption_type_figure, figures.diversity_figure):
        fig = draw(runs, setting)
        legend = fig.legends[0]
        for handle, label in zip(legend.legend_handles, legend.get_texts()):
            assert to_hex(handle.get_color()) == to_hex(color(label.get_text())), (draw.__name__, label.get_text())
        plt.close(fig)


def test_benchmark_figure_shows_each_method_minus_de_beside_the_papers_gaps(runs):
    """Our methods spread over their axes instead of collapsing beside the paper's numbers: each point is the
    method minus DE paired by seed (as in differences.md), each diamond the paper's method minus the paper's DE."""
    setting = setting_of(runs[0])
    table = benchmark_table(runs, setting, paper=True)
    fig = figures.benchmark_figure(table, runs)
    assert_fits(fig)
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert set(panels) == {"NLL ↓", "Accuracy (%) ↑", "ECE ↓", "cA (%) ↑", "cNLL ↓", "cECE ↓"}
    ca = panels["cA (%) ↑"]
    assert ca.get_title() == f"cA (%) ↑\nDE {table.value('DE', 'corrupted/accuracy').mean * 100:.1f}, paper's DE 78.1"
    labels = [t.get_text() for t in ca.get_yticklabels()]
    assert "DE" not in labels and labels[-1] == "FoRDE-PCA"
    pca = {r.seed: r.metric("corrupted/accuracy") for r in runs if r.variant == "FoRDE-PCA"}
    de = {r.seed: r.metric("corrupted/accuracy") for r in runs if r.variant == "DE"}
    expected = statistics.fmean(100 * (pca[s] - de[s]) for s in pca)
    ours = set(MARKERS.values())  # each row's own marker; the paper's diamonds are "D"
    points = {round(line.get_ydata()[0]): line.get_xdata()[0] for line in ca.lines if line.get_marker() in ours}
    assert points[labels.index("FoRDE-PCA")] == pytest.approx(expected)
    diamonds = {round(line.get_ydata()[0]): line.get_xdata()[0] for line in ca.lines if line.get_marker() == "D"}
    assert len(diamonds) == 7 and diamonds[labels.index("FoRDE-PCA")] == pytest.approx(80.5 - 78.1)
    for title, ax in panels.items():  # our methods and their spreads, not the paper's scale, span every axis
        ours = [
            x for bars in ax.containers for lines in bars[2] for segment in lines.get_segments() for x, _ in segment
        ]
        low, high = ax.get_xlim()
        assert (max(ours) - min(ours)) / (high - low) > 1 / 3, title
    plt.close(fig)


def test_lengthscale_figure_gives_seeds_per_alpha_a_de_band_and_a_title_that_fits(runs):
    fig = figures.lengthscale_figure(runs, setting_of(runs[0]))
    assert_fits(fig)
    shown = [t.get_text() for t in texts(fig)]
    assert shown.count("n=5") == 3 and shown.count("n=3") == 6  # PCA (alpha = 1) has 5 seeds, the others 3
    assert "DE: mean ± std over 5 seeds" in shown and "Bands: ± one sample standard deviation over seeds." in shown
    de = to_rgb(color("DE"))
    for ax in fig.axes[:3]:
        assert any(patch.get_facecolor()[:3] == de for patch in ax.patches), "no DE band"
    plt.close(fig)


@pytest.mark.parametrize("draw", [figures.severity_figure, figures.corruption_type_figure, figures.diversity_figure])
def test_per_severity_figures_say_what_their_error_bars_are(runs, draw):
    fig = draw(runs, setting_of(runs[0]))
    assert_fits(fig)
    shown = " ".join(t.get_text() for t in texts(fig))
    assert "error bars ± one sample standard deviation over seeds (3 seeds each; DE, FoRDE-PCA: 5)" in shown
    if draw is figures.diversity_figure:  # descriptions, not scores: more epistemic uncertainty is not better
        assert [ax.get_title() for ax in fig.axes] == ["Input-gradient cosine distance", "Epistemic uncertainty"]
    plt.close(fig)


def overlaps(a: Text, b: Text) -> bool:
    return a.get_window_extent().overlaps(b.get_window_extent())


def test_optuna_figures_keep_their_titles_and_legends_clear_and_leave_the_seed_of_a_grid_out(study):
    opt = optuna.load_study(study_name="paper_lite_cifar10", storage=f"sqlite:///{study / 'study.db'}")
    objective = Objective(opt, 0)
    fig = importance_figure(opt, objective)
    ax = fig.axes[0]
    titles = [t for t in texts(fig) if t in (ax.title, ax._left_title, ax._right_title)]
    assert all(not overlaps(a, b) for i, a in enumerate(titles) for b in titles[i + 1 :])
    assert objective.label in ax.get_title(loc="left")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["method.alpha", "method.name"]  # seed: not a setting
    assert "seed left out (5 configurations ran at several seeds" in ax.get_title(loc="left")
    plt.close(fig)
    fig = parallel_figure(opt, objective)
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [objective.label]
    names = [t for t in texts(fig) if t in ax.get_xticklabels()]
    assert [t.get_text() for t in names] == ["corrupted/accuracy", "method.alpha", "method.name"]
    assert not any(legend.get_window_extent().overlaps(t.get_window_extent()) for t in names)
    plt.close(fig)


def test_a_study_that_varies_only_the_seed_has_no_importances_to_draw(tmp_path):
    opt = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 'study.db'}")
    seeds = {"seed": optuna.distributions.CategoricalDistribution([0, 1, 2])}
    for seed in range(3):
        opt.add_trial(optuna.trial.create_trial(params={"seed": seed}, distributions=seeds, value=0.5 + seed / 10))
    for draw in (importance_figure, parallel_figure):
        with pytest.raises(figures.Skip, match="varies only the seed"):
            draw(opt, Objective(opt, 0))


# ---------------------------------------------------------------------------------------------------------------
# A newcomer's first report: the quickstart's trials, one seed each, no DE

from forde.analysis.aggregate import distinguish  # noqa: E402
from forde.analysis.results import find_runs  # noqa: E402
from forde.analysis.study_figures import slice_figure  # noqa: E402
from test_report_tables import set_config  # noqa: E402

QUICKSTART = {  # trial -> alpha, bandwidth scale, learning rate, clean accuracy: two trials 0.05 points apart
    "trial-0001": (0.1512301348454066, 1.7276385547059794, 0.05494682815178393, 0.9890),
    "trial-0003": (0.13125339120858706, 1.64010010128287, 0.044350291467884134, 0.9895),
}


@pytest.fixture
def one_seed_runs(tmp_path):
    rng = random.Random(1)
    for name, (alpha, bandwidth, lr, accuracy) in QUICKSTART.items():
        summary, per_set = full_summary(accuracy, 0.041, 0.012, 0.02, 0.3, 0.05, rng)
        set_config(
            write_run(tmp_path, name, "forde", 0, summary, alpha, per_set),
            **{"method.bandwidth_scale": bandwidth, "optim.lr": lr},
        )
    runs = find_runs(tmp_path)
    distinguish(runs)
    return runs


def caption(fig) -> str:
    return " ".join(t.get_text() for t in texts(fig))


@pytest.mark.parametrize("draw", [figures.severity_figure, figures.corruption_type_figure, figures.diversity_figure])
def test_one_seed_figures_tell_their_runs_apart_and_promise_no_error_bars(one_seed_runs, draw):
    fig = draw(one_seed_runs, setting_of(one_seed_runs[0]))
    assert_fits(fig)
    shown = caption(fig)
    assert "1 seed each" in shown and "error bars" not in shown and "1 seeds" not in shown
    handles = fig.legends[0].legend_handles
    assert len({to_hex(h.get_color()) for h in handles}) == 2  # not one blue for both trials
    if draw is not figures.diversity_figure:  # bars carry no markers
        assert len({h.get_marker() for h in handles}) == 2
    plt.close(fig)


def test_one_seed_benchmark_figure_has_an_honest_axis_distinct_rows_and_no_error_bar_caption(one_seed_runs):
    setting = setting_of(one_seed_runs[0])
    fig = figures.benchmark_figure(benchmark_table(one_seed_runs, setting), one_seed_runs)
    assert_fits(fig)
    shown = caption(fig)
    assert "Error bars" not in shown and "1 seed each" in shown and "ours: 1 seed" in shown
    accuracy = next(ax for ax in fig.axes if ax.get_title().startswith("Accuracy"))
    low, high = accuracy.get_xlim()
    assert high - low >= 0.1 * 98.9 - 1e-9 and high <= 100
    points = [line for line in accuracy.lines if line.get_xdata().size]
    assert len({(to_hex(p.get_color()), p.get_marker()) for p in points}) == 2
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "FoRDE-Tuned (α=0.131)\n[method.bandwidth_scale=1.64,\noptim.lr=0.0444]"
    plt.close(fig)


def test_no_lengthscale_curve_over_alpha_when_the_trials_varied_more_than_alpha(one_seed_runs):
    with pytest.raises(figures.Skip, match=r"differ in more than method.alpha \(method.bandwidth_scale, optim.lr\)"):
        figures.lengthscale_figure(one_seed_runs, setting_of(one_seed_runs[0]))


def test_a_one_seed_lengthscale_grid_has_plain_ticks_a_sensible_range_and_says_1_seed(tmp_path):
    """Accuracies 0.01 points apart: the y axis once read "+8.45e1" with ticks 0.00 and 0.01."""
    for alpha, accuracy in ((0.0, 0.84501), (0.5, 0.84507), (1.0, 0.84512)):
        summary = {"test/accuracy": accuracy, "corrupted/severity_4-5/accuracy": accuracy, "test/nll": 0.5}
        write_run(tmp_path, f"alpha-{alpha}", "forde", 0, summary, alpha)
    runs = find_runs(tmp_path)
    distinguish(runs)
    fig = figures.lengthscale_figure(runs, setting_of(runs[0]))
    shown = caption(fig)
    assert "FoRDE: 1 seed per α" in shown and "Bands" not in shown and "1 seeds" not in shown
    for ax in fig.axes:
        if ax.get_visible():
            low, high = ax.get_ylim()
            assert high - low >= 8.45
            formatter = ax.yaxis.get_major_formatter()
            assert not formatter.get_useOffset() and formatter.get_offset() == ""
            assert all(abs(tick - 84.5) < 10 for tick in ax.get_yticks())
    plt.close(fig)


def test_optuna_figures_write_plain_numbers(tmp_path):
    opt = optuna.create_study(direction="minimize", storage=f"sqlite:///{tmp_path / 'study.db'}")
    space = {"optim.lr": optuna.distributions.FloatDistribution(0.01, 0.1, log=True)}
    for lr, nll in ((0.019, 84.5012), (0.044, 84.5013), (0.055, 84.5011)):
        opt.add_trial(optuna.trial.create_trial(params={"optim.lr": lr}, distributions=space, value=nll))
    fig = slice_figure(opt, Objective(opt, 0))
    ax = fig.axes[0]
    labels = [t.get_text() for t in texts(fig) if t in ax.get_xticklabels()]
    assert labels and all("10^" not in label and "×" not in label for label in labels), labels
    assert not ax.yaxis.get_major_formatter().get_useOffset() and ax.yaxis.get_major_formatter().get_offset() == ""
    plt.close(fig)


def test_one_seed_ensemble_size_figure_promises_no_bands(tmp_path):
    for size, nll in ((3, 0.5012), (5, 0.5011)):
        write_run(tmp_path, f"de-M{size}", "de", 0, {"test/accuracy": 0.8, "test/nll": nll}, size=size)
    fig = figures.ensemble_size_figure(find_runs(tmp_path), "ResNet10, width 16 / CIFAR-10")
    assert "1 seed each" in caption(fig) and "bands" not in caption(fig)
    low, high = fig.axes[0].get_ylim()
    assert high - low >= 0.05
    plt.close(fig)


def test_a_figure_saved_twice_is_the_same_bytes(tmp_path, monkeypatch):
    """No creation date in the PDF: a report drawn again from the same runs, a day later, changes no committed
    file (matplotlib stamps the time, or $SOURCE_DATE_EPOCH, unless told not to)."""
    import matplotlib.pyplot as plt

    from forde.analysis import style

    for name, when in (("a", "0"), ("b", "86400")):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", when)
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        style.save(fig, tmp_path / name)
    for ext in ("png", "pdf"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes(), ext
