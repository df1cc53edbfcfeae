"""The paper's figures from finished runs. Each function returns a matplotlib figure or raises `Skip`
naming the missing input, so a report can draw what its runs support and say why it left out the rest.

Severity 0 stands for the clean test set throughout.
"""

from __future__ import annotations

import math

from matplotlib.lines import Line2D

from forde.analysis import style
from forde.analysis.aggregate import Setting, Stat, by_variant, metric_stat, stat
from forde.analysis.results import Run
from forde.analysis.tables import REGENERATED, Table
from forde.analysis.variants import BASE, TUNED, color
from forde.data.corruption_names import CORRUPTIONS

ACCURACY, NLL, ECE = ("Accuracy (%)", "accuracy", 100.0, "↑"), ("NLL", "nll", 1.0, "↓"), ("ECE", "ece", 1.0, "↓")
LENGTHSCALE_PANELS = (("Clean data", "test/accuracy"), ("Severity 1, 2, 3", "corrupted/severity_1-3/accuracy"),
                      ("Severity 4, 5", "corrupted/severity_4-5/accuracy"))


class Skip(Exception):
    """The runs lack what a figure needs; the message says what."""


REGENERATED_NOTE = " (corrupted sets generated here)"


def _title(setting: Setting, runs: list[Run]) -> str:
    """The setting's title, saying so when some corrupted-data number comes from sets generated here."""
    return setting.title + (REGENERATED_NOTE if any(r.regenerated for r in runs) else "")


def severity_key(metric: str, severity: int) -> str:
    return f"test/{metric}" if severity == 0 else f"corrupted/severity_{severity}/{metric}"


def severities(runs: list[Run]) -> list[int]:
    """0 (clean) and every corruption severity some run was evaluated at."""
    return [0] + [k for k in range(1, 6) if any(r.metric(severity_key("accuracy", k)) is not None for r in runs)]


def _mean_std(stats: list[Stat | None], scale: float) -> tuple[list[float], list[float]]:
    return ([s.mean * scale if s else math.nan for s in stats], [s.std * scale if s else math.nan for s in stats])


def _legend_below(fig, labels: list[str], markers: bool = True) -> None:
    handles = [Line2D([], [], color=color(v), marker="o" if markers else None, lw=1.3) for v in labels]
    _layout(fig, handles, labels)


def _layout(fig, handles: list, labels: list[str]) -> None:
    """A legend under the axes and room for the suptitle, both a fixed height in inches."""
    height, ncol = fig.get_figheight(), min(len(labels), 7)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, (0.12 + 0.17 * math.ceil(len(labels) / ncol)) / height, 1, 1 - 0.1 / height))


@style.styled
def lengthscale_figure(runs: list[Run], setting: Setting):
    """Accuracy vs FoRDE's alpha on clean data and at severities 1-3 and 4-5 (appendix D.4): FoRDE as a
    line with a band of one std over seeds, DE as a dashed line."""
    forde = [r for r in runs if r.method == "forde" and r.alpha is not None]
    alphas = sorted({r.alpha for r in forde})
    if len(alphas) < 2:
        raise Skip(f"needs FoRDE runs at two or more values of method.alpha (found {alphas or 'none'})")
    panels = [(t, k) for t, k in LENGTHSCALE_PANELS if any(r.metric(k) is not None for r in forde)]
    de = [r for r in runs if r.method == "de"]
    fig, axes = style.figure(3, height=1.9)
    for ax, (title, key) in zip(axes[0], panels):
        mean, std = _mean_std([metric_stat([r for r in forde if r.alpha == a], key) for a in alphas], 100.0)
        ax.fill_between(alphas, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=TUNED, alpha=0.2, lw=0)
        ax.plot(alphas, mean, "o-", color=TUNED)
        baseline = metric_stat(de, key)
        if baseline:
            ax.axhline(baseline.mean * 100.0, ls="--", color=BASE["DE"], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("α")
    for ax in axes[0][len(panels):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("Accuracy (%)")
    fig.suptitle(f"{_title(setting, runs)}: FoRDE lengthscales from identity (α = 0) to PCA (α = 1)")
    _layout(fig, [Line2D([], [], color=TUNED, marker="o"), Line2D([], [], color=BASE["DE"], ls="--")],
            ["FoRDE (mean ± std over seeds)", "DE (mean)"])
    return fig


@style.styled
def benchmark_figure(table: Table):
    """The benchmark table drawn: one panel per metric, mean ± std per variant; the paper's numbers as
    open diamonds when the table carries them."""
    cols = table.columns
    ncols = 3
    nrows = math.ceil(len(cols) / ncols)
    rows = table.rows
    fig, axes = style.figure(ncols, nrows, height=0.28 * len(rows) + 0.7, sharey=True)
    for ax, col in zip(axes.flat, cols):
        for y, row in enumerate(rows):
            s = row.cells.get(col.key)
            if s:
                ax.errorbar(s.mean * col.scale, y, xerr=s.std * col.scale, fmt="o", color=color(row.variant),
                            capsize=2, elinewidth=1)
            if col.key in row.paper:
                ax.plot(float(row.paper[col.key]), y, "D", mfc="none", mec="0.25", ms=4)
        ax.set_title(f"{col.label} {col.arrow}")
        ax.set_yticks(range(len(rows)), [r.variant for r in rows])
        ax.grid(axis="y", visible=False)
    axes[0][0].invert_yaxis()
    for ax in axes.flat[len(cols):]:
        ax.set_visible(False)
    regenerated = any(REGENERATED in marks for r in rows for marks in r.marks.values())
    fig.suptitle(table.setting.title + (REGENERATED_NOTE if regenerated else ""))
    if table.paper_source:
        _layout(fig, [Line2D([], [], color="0.25", marker="o", ls="none"),
                      Line2D([], [], mec="0.25", mfc="none", marker="D", ls="none")],
                ["ours: mean ± std over seeds", f"paper ({table.paper_source})"])
    else:
        fig.tight_layout()
    return fig


@style.styled
def severity_figure(runs: list[Run], setting: Setting):
    """Accuracy, NLL and ECE against corruption severity per variant (appendix D.2)."""
    xs = severities(runs)
    if len(xs) < 2:
        raise Skip("no corrupted results (summary keys corrupted/severity_k/...)")
    groups = by_variant(runs)
    fig, axes = style.figure(3, height=2.0)
    for ax, (label, metric, scale, arrow) in zip(axes[0], (ACCURACY, NLL, ECE)):
        for i, (v, rs) in enumerate(groups.items()):
            mean, std = _mean_std([metric_stat(rs, severity_key(metric, k)) for k in xs], scale)
            dodge = (i - (len(groups) - 1) / 2) * 0.07
            ax.errorbar([x + dodge for x in xs], mean, yerr=std, color=color(v), marker="o", capsize=1.5, lw=1)
        ax.set_xticks(xs, ["clean" if k == 0 else str(k) for k in xs])
        ax.set_xlabel("Corruption severity")
        ax.set_ylabel(f"{label} {arrow}")
    fig.suptitle(_title(setting, runs))
    _legend_below(fig, list(groups))
    return fig


@style.styled
def corruption_type_figure(runs: list[Run], setting: Setting):
    """Accuracy per corruption type and severity, one panel per type plus their average (appendix D.3)."""
    found = {row["corruption"] for r in runs for row in r.per_set}
    if not found:
        raise Skip("no per-corruption results (results.json corrupted.per_set; absent for Optuna/W&B-only runs)")
    types = [c for c in CORRUPTIONS if c in found] + sorted(found - set(CORRUPTIONS))
    sev = severities(runs)[1:]
    groups = by_variant(runs)
    ncols = min(5, len(types) + 1)
    nrows = math.ceil((len(types) + 1) / ncols)
    fig, axes = style.figure(ncols, nrows, height=1.45 + 0.7 / nrows, sharex=True, sharey=True)  # + title, legend
    for ax, name in zip(axes.flat, types + ["Average"]):
        for v, rs in groups.items():
            stats = [_type_stat(rs, name, k) for k in sev]
            mean, std = _mean_std(stats, 100.0)
            ax.errorbar(sev, mean, yerr=std, color=color(v), marker="o", ms=2.5, capsize=1, lw=1)
        ax.set_title(name.replace("_", " "))
        ax.set_xticks(sev)
    for ax in axes.flat[len(types) + 1:]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("Accuracy (%)")
    for ax in axes[-1]:
        ax.set_xlabel("Severity")
    fig.suptitle(_title(setting, runs))
    _legend_below(fig, list(groups))
    return fig


def _type_stat(runs: list[Run], corruption: str, severity: int) -> Stat | None:
    if corruption == "Average":
        return metric_stat(runs, severity_key("accuracy", severity))
    return stat(row["accuracy"] for r in runs for row in r.per_set
                if row["corruption"] == corruption and row["severity"] == severity)


@style.styled
def ensemble_size_figure(runs: list[Run], title: str):
    """NLL against the ensemble size on clean and corrupted data (appendix B)."""
    groups = {v: rs for v, rs in by_variant(runs).items() if len({r.ensemble_size for r in rs}) >= 2}
    if not groups:
        raise Skip("needs runs of one variant at two or more ensemble sizes")
    panels = [("Clean data", "test/nll"), ("Corrupted data", "corrupted/nll")]
    panels = [(t, k) for t, k in panels if any(r.metric(k) is not None for rs in groups.values() for r in rs)]
    fig, axes = style.figure(len(panels), height=2.0, width=2.4 * len(panels) + 0.6)
    for ax, (name, key) in zip(axes[0], panels):
        for v, rs in groups.items():
            sizes = sorted({r.ensemble_size for r in rs})
            mean, std = _mean_std([metric_stat([r for r in rs if r.ensemble_size == m], key) for m in sizes], 1.0)
            ax.fill_between(sizes, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=color(v), alpha=0.2, lw=0)
            ax.plot(sizes, mean, "o-", color=color(v))
            ax.set_xticks(sizes)
        ax.set_title(name)
        ax.set_xlabel("Ensemble size")
        ax.set_ylabel("NLL ↓")
    fig.suptitle(title + (REGENERATED_NOTE if any(r.regenerated for r in runs) else ""))
    _legend_below(fig, list(groups))
    return fig


@style.styled
def diversity_figure(runs: list[Run], setting: Setting):
    """Input-gradient cosine distance and epistemic uncertainty against severity (appendix D.1)."""
    metrics = [(label, m) for label, m in (("Gradient cosine distance ↑", "grad_cosine_distance"),
                                            ("Epistemic uncertainty ↑", "epistemic"))
               if any(r.metric(f"test/{m}") is not None for r in runs)]
    if not metrics:
        raise Skip("no gradient-diversity or epistemic-uncertainty results")
    xs = severities(runs)
    groups = by_variant(runs)
    width = 0.8 / len(groups)
    fig, axes = style.figure(len(metrics), height=2.0)
    for ax, (label, metric) in zip(axes[0], metrics):
        for i, (v, rs) in enumerate(groups.items()):
            mean, std = _mean_std([metric_stat(rs, severity_key(metric, k)) for k in xs], 1.0)
            ax.bar([x + (i - (len(groups) - 1) / 2) * width for x in xs], mean, width, yerr=std, color=color(v),
                   error_kw={"elinewidth": 0.7, "capsize": 1.2, "ecolor": "0.35"})
        ax.set_xticks(xs, ["clean" if k == 0 else str(k) for k in xs])
        ax.set_xlabel("Corruption severity")
        ax.set_title(label)
        ax.grid(axis="x", visible=False)
    fig.suptitle(_title(setting, runs))
    _legend_below(fig, list(groups), markers=False)
    return fig
