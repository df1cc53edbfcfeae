"""The paper's figures from finished runs. Each function returns a matplotlib figure or raises `Skip`
naming the missing input, so a report can draw what its runs support and say why it left out the rest.

Severity 0 stands for the clean test set throughout.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter

from matplotlib.lines import Line2D

from forde.analysis import style
from forde.analysis.aggregate import Setting, Stat, by_variant, metric_stat, seed_count, seed_values, stat
from forde.analysis.results import Run
from forde.analysis.tables import REGENERATED, Table, paired_differences
from forde.analysis.variants import BASE, TUNED, styles
from forde.data.corruption_names import CORRUPTIONS

ACCURACY, NLL, ECE = ("Accuracy (%)", "accuracy", 100.0, "↑"), ("NLL", "nll", 1.0, "↓"), ("ECE", "ece", 1.0, "↓")
LENGTHSCALE_PANELS = (
    ("Clean data", "test/accuracy"),
    ("Severity 1, 2, 3", "corrupted/severity_1-3/accuracy"),
    ("Severity 4, 5", "corrupted/severity_4-5/accuracy"),
)
SPREAD = "± one sample standard deviation over seeds"
BASELINE = "DE"


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


def seeds_note(groups: dict[str, list[Run]]) -> str:
    """How many seeds each variant has: "3 seeds each" or "3 seeds each; DE, FoRDE-PCA: 5"."""
    counts = {v: seed_count(rs) for v, rs in groups.items()}
    common = Counter(counts.values()).most_common(1)[0][0]
    exceptions: dict[int, list[str]] = {}
    for v, n in counts.items():
        if n != common:
            exceptions.setdefault(n, []).append(v)
    return f"{common} seed{'s' if common != 1 else ''} each" + "".join(
        f"; {', '.join(vs)}: {n}" for n, vs in sorted(exceptions.items())
    )


def one_seed(groups: dict[str, list[Run]] | list[list[Run]]) -> bool:
    """Every variant (or point) has one seed: there is no spread to draw, and a figure's caption says so."""
    return all(seed_count(rs) == 1 for rs in (groups.values() if isinstance(groups, dict) else groups))


ONE_SEED = "1 seed each: one run's values, no spread over seeds to show."


def spread_note(groups: dict[str, list[Run]], note: str) -> str:
    """The caption `note` about error bars or bands, or, when every variant has one seed, that there are none."""
    return ONE_SEED if one_seed(groups) else note


def at_least(ax, values: list[float], relative: float = 0.1, axis: str = "y", size: float | None = None) -> None:
    """Widen an axis to at least `relative` of the values' magnitude (or of `size`), kept within 0-100 for values
    that lie there: without error bars, a 0.05-point gap between two single runs would fill the panel and read as
    a large effect."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return
    low, high = min(values), max(values)
    span = relative * (abs(size) if size is not None else max(abs(low), abs(high)))
    if span == 0 or (high - low) * 1.1 >= span:
        return
    bottom, top = (low + high - span) / 2, (low + high + span) / 2
    if low >= 0 and bottom < 0:  # a score that is never negative
        bottom, top = 0.0, span
    if low >= 0 and high <= 100 < top:  # a percentage
        bottom, top = 100.0 - span, 100.0
    (ax.set_ylim if axis == "y" else ax.set_xlim)(bottom, top)


def _legend_below(fig, labels: list[str], markers: bool = True, note: str = "") -> None:
    look = styles(labels)
    handles = [Line2D([], [], color=look[v][0], marker=look[v][1] if markers else None, lw=1.3) for v in labels]
    _layout(fig, handles, labels, note)


def _layout(fig, handles: list, labels: list[str], note: str = "") -> None:
    """A legend under the axes (as many columns as fit the width) and a note under it, each a fixed height in
    inches (tight_layout leaves room for the suptitle itself)."""
    height, size = fig.get_figheight(), style.RC["legend.fontsize"]
    note = textwrap.fill(note, width=int(fig.get_figwidth() * 72 / (0.55 * size)))  # about 0.55 em per character
    note_height = 0.16 * (note.count("\n") + 1) if note else 0.0
    if note:
        fig.text(0.5, 0.0, note, ha="center", va="bottom", fontsize=size, multialignment="center")
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(len(labels), 7), 0, -1):
        legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, bbox_to_anchor=(0.5, note_height / height))
        if ncol == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            break
        legend.remove()
    bottom = 0.12 + 0.17 * math.ceil(len(labels) / ncol) + note_height
    fig.tight_layout(rect=(0, bottom / height, 1, 1))


@style.styled
def lengthscale_figure(runs: list[Run], setting: Setting):
    """Accuracy vs FoRDE's alpha on clean data and at severities 1-3 and 4-5 (appendix D.4): FoRDE as a
    line with a band of one std over seeds, DE as a dashed line with its own band; how many seeds each
    alpha has is in the legend, or beside each point where they differ."""
    forde = [r for r in runs if r.method == "forde" and r.alpha is not None]
    alphas = sorted({r.alpha for r in forde if r.alpha is not None})
    if len(alphas) < 2:
        raise Skip(f"needs FoRDE runs at two or more values of method.alpha (found {alphas or 'none'})")
    varied = sorted(
        {part.split("=")[0] for r in forde for part in r.distinction.split(", ") if part} - {"method.alpha"}
    )
    if varied:  # a sweep's trials: a line over alpha would credit alpha with what the other settings did
        raise Skip(
            f"the FoRDE runs differ in more than method.alpha ({', '.join(varied)}): the benchmark figure shows each "
            "run, the Optuna slice figure each setting against the objective"
        )
    panels = [(t, k) for t, k in LENGTHSCALE_PANELS if any(r.metric(k) is not None for r in forde)]
    de = [r for r in runs if r.method == "de"]
    fig, axes = style.figure(3, height=2.7)
    stats = {key: [metric_stat([r for r in forde if r.alpha == a], key) for a in alphas] for _, key in panels}
    counts = {s.n for per_alpha in stats.values() for s in per_alpha if s}
    bands = counts != {1} or seed_count(de) > 1  # else no spread to show anywhere
    for ax, (title, key) in zip(axes[0], panels):
        baseline = metric_stat(de, key)
        if not bands:
            at_least(ax, [s.mean * 100.0 for s in stats[key] if s] + ([baseline.mean * 100.0] if baseline else []))
        if baseline:
            low, high = (100.0 * (baseline.mean + d * baseline.std) for d in (-1, 1))
            ax.axhspan(low, high, color=BASE["DE"], alpha=0.1, lw=0)
            ax.axhline(baseline.mean * 100.0, ls="--", color=BASE["DE"], lw=1.2)
        mean, std = _mean_std(stats[key], 100.0)
        ax.fill_between(
            alphas, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=TUNED, alpha=0.2, lw=0
        )
        ax.plot(alphas, mean, "o-", color=TUNED)
        if len(counts) > 1:  # the seeds behind each point, where alphas have different numbers of them
            for a, m, s in zip(alphas, mean, stats[key]):
                if s:
                    ax.annotate(
                        f"n={s.n}",
                        (a, m),
                        textcoords="offset points",
                        xytext=(0, -5),
                        ha="center",
                        va="top",
                        fontsize=6,
                        color=TUNED,
                    )
        ax.set_title(title)
        ax.set_xlabel("α")
    for ax in axes[0][len(panels) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("Accuracy (%)")
    fig.suptitle(f"{_title(setting, runs)}\nFoRDE's lengthscales from identity (α = 0) to PCA (α = 1)")
    handles = [Line2D([], [], color=TUNED, marker="o")]
    if counts == {1}:
        labels = ["FoRDE: 1 seed per α"]
    else:
        per_alpha = f"{counts.pop()} seeds per α" if len(counts) == 1 else "n seeds per α as marked"
        labels = [f"FoRDE: mean ± std over seeds ({per_alpha})"]
    if de:
        handles.append(Line2D([], [], color=BASE["DE"], ls="--"))
        labels.append("DE: 1 seed" if seed_count(de) == 1 else f"DE: mean ± std over {seed_count(de)} seeds")
    _layout(fig, handles, labels, note=f"Bands: {SPREAD}." if bands else ONE_SEED)
    return fig


@style.styled
def benchmark_figure(table: Table, runs: list[Run]):
    """The benchmark table drawn, one panel per metric, so that methods read against each other at a glance.
    With DE and another method among the runs: each variant minus DE on the seeds both ran (mean ± std over
    seeds, as in differences.md) and, when the table carries the paper's numbers, the paper's variants minus the paper's DE
    as open diamonds on the same axis: the paper's gaps beside ours, though its scores are on another scale
    (DE's own values head each panel). Without DE: our means ± std over seeds."""
    groups = by_variant(runs)
    base = groups.get(BASELINE) if len(groups) > 1 else None
    rows = [r for r in table.rows if r.variant != BASELINE] if base else table.rows
    look = styles([r.variant for r in rows])
    names = [_wrapped(r.variant) for r in rows]
    cols = table.columns
    ncols, nrows = 3, math.ceil(len(cols) / 3)
    per_row = 0.13 * (1 + max((n.count("\n") + 1 for n in names), default=1))  # 0.26 in for a label of one line
    fig, axes = style.figure(ncols, nrows, height=per_row * len(rows) + 0.95, sharey=True)
    paper = bool(table.paper_source) and base is not None
    single = one_seed(groups)
    for ax, col in zip(axes.flat, cols):
        paper_base = _paper_value(table, BASELINE, col.key)
        drawn = []
        for y, row in enumerate(rows):
            s = (
                stat(paired_differences(groups.get(row.variant, []), base, col.key).values())
                if base
                else row.cells.get(col.key)
            )
            if s:
                ax.errorbar(
                    s.mean * col.scale,
                    y,
                    xerr=s.std * col.scale if s.n > 1 else None,
                    fmt=look[row.variant][1],
                    color=look[row.variant][0],
                    capsize=2,
                    elinewidth=1,
                )
                drawn.append(s.mean * col.scale)
            mine = _paper_value(table, row.variant, col.key)
            if paper and mine is not None and paper_base is not None:
                ax.plot(mine - paper_base, y, "D", mfc="none", mec="0.35", ms=4)
        title = f"{col.label} {col.arrow}"
        de = table.value(BASELINE, col.key)
        if single:  # no error bars: the values' own size, or DE's, sets the least span of the axis
            at_least(ax, drawn + ([0.0] if base else []), axis="x", size=de.mean * col.scale if base and de else None)
        if base:
            ax.axvline(0.0, color=BASE[BASELINE], lw=0.8, ls="--")
            anchors = [f"DE {col.fmt(de.mean)}"] if de else []
            if paper and paper_base is not None:
                anchors.append(f"paper's DE {_paper_text(table, BASELINE, col.key)}")
            title += "\n" + ", ".join(anchors)
            ax.set_xlabel(f"minus DE ({'higher' if col.higher_is_better else 'lower'} is better)")
        ax.set_title(title)
        ax.set_yticks(range(len(rows)), names)
        ax.grid(axis="y", visible=False)
    axes[0][0].invert_yaxis()
    for ax in axes.flat[len(cols) :]:
        ax.set_visible(False)
    regenerated = any(REGENERATED in marks for r in rows for marks in r.marks.values())
    fig.suptitle(table.setting.title + (REGENERATED_NOTE if regenerated else ""))
    ours = "ours minus DE, paired by seed" if base else "ours"
    handles = [Line2D([], [], color="0.25", marker="o", ls="none")]
    labels = [f"{ours}: {'1 seed' if single else 'mean over seeds'}"]
    if paper:
        handles.append(Line2D([], [], mec="0.35", mfc="none", marker="D", ls="none"))
        labels.append(f"paper ({table.paper_source}) minus the paper's DE")
    note = spread_note(groups, f"Error bars {SPREAD} ({seeds_note(groups)}).")
    if table.paper_source and not base:
        note += (
            f" The paper's numbers ({table.paper_source}) are drawn as differences to its DE, beside ours: that"
            " needs runs of DE and another method here."
        )
    _layout(fig, handles, labels, note=note)
    return fig


def _wrapped(label: str, width: int = 40) -> str:
    """A row's label on lines of its own: the variant, then what sets its recipe apart (which can be long)."""
    return "\n".join(textwrap.fill(part, width) for part in label.replace(" [", "\n[").split("\n"))


def _paper_text(table: Table, variant: str, key: str) -> str | None:
    """The paper's number for a variant and metric as printed, in the table's display units."""
    return next((r.paper.get(key) for r in table.rows if r.variant == variant), None)


def _paper_value(table: Table, variant: str, key: str) -> float | None:
    text = _paper_text(table, variant, key)
    return float(text) if text else None


@style.styled
def severity_figure(runs: list[Run], setting: Setting):
    """Accuracy, NLL and ECE against corruption severity per variant (appendix D.2)."""
    xs = severities(runs)
    if len(xs) < 2:
        raise Skip("no corrupted results (summary keys corrupted/severity_k/...)")
    groups = by_variant(runs)
    look, single = styles(list(groups)), one_seed(groups)
    fig, axes = style.figure(3, height=2.0)
    for ax, (label, metric, scale, arrow) in zip(axes[0], (ACCURACY, NLL, ECE)):
        drawn = []
        for i, (v, rs) in enumerate(groups.items()):
            mean, std = _mean_std([metric_stat(rs, severity_key(metric, k)) for k in xs], scale)
            dodge = (i - (len(groups) - 1) / 2) * 0.07
            bars = None if single else std
            ax.errorbar(
                [x + dodge for x in xs], mean, yerr=bars, color=look[v][0], marker=look[v][1], capsize=1.5, lw=1
            )
            drawn += mean
        if single:
            at_least(ax, drawn)
        ax.set_xticks(xs, ["clean" if k == 0 else str(k) for k in xs])
        ax.set_xlabel("Corruption severity")
        ax.set_ylabel(f"{label} {arrow}")
    fig.suptitle(_title(setting, runs))
    _legend_below(
        fig, list(groups), note=spread_note(groups, f"Mean over seeds; error bars {SPREAD} ({seeds_note(groups)}).")
    )
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
    look, single = styles(list(groups)), one_seed(groups)
    ncols = min(5, len(types) + 1)
    nrows = math.ceil((len(types) + 1) / ncols)
    fig, axes = style.figure(ncols, nrows, height=1.45 + 0.85 / nrows, sharex=True, sharey=True)  # + title, legend
    drawn = []
    for ax, name in zip(axes.flat, types + ["Average"]):
        for v, rs in groups.items():
            stats = [_type_stat(rs, name, k) for k in sev]
            mean, std = _mean_std(stats, 100.0)
            ax.errorbar(
                sev, mean, yerr=None if single else std, color=look[v][0], marker=look[v][1], ms=2.5, capsize=1, lw=1
            )
            drawn += mean
        ax.set_title(name.replace("_", " "))
        ax.set_xticks(sev)
    for ax in axes.flat[len(types) + 1 :]:
        ax.set_visible(False)
    if single:  # the panels share their y axis
        at_least(axes[0][0], drawn)
    for row in axes:
        row[0].set_ylabel("Accuracy (%)")
    for ax in axes[-1]:
        ax.set_xlabel("Severity")
    fig.suptitle(_title(setting, runs))
    _legend_below(
        fig, list(groups), note=spread_note(groups, f"Mean over seeds; error bars {SPREAD} ({seeds_note(groups)}).")
    )
    return fig


def _type_stat(runs: list[Run], corruption: str, severity: int) -> Stat | None:
    if corruption == "Average":
        return metric_stat(runs, severity_key("accuracy", severity))
    return stat(
        seed_values(
            runs,
            lambda r: next(
                (
                    row["accuracy"]
                    for row in r.per_set
                    if row["corruption"] == corruption and row["severity"] == severity
                ),
                None,
            ),
        ).values()
    )


@style.styled
def ensemble_size_figure(runs: list[Run], title: str):
    """NLL against the ensemble size on clean and corrupted data (appendix B)."""
    groups = {v: rs for v, rs in by_variant(runs).items() if len({r.ensemble_size for r in rs}) >= 2}
    if not groups:
        raise Skip("needs runs of one variant at two or more ensemble sizes")
    panels = [("Clean data", "test/nll"), ("Corrupted data", "corrupted/nll")]
    panels = [(t, k) for t, k in panels if any(r.metric(k) is not None for rs in groups.values() for r in rs)]
    fig, axes = style.figure(len(panels), height=2.2, width=2.4 * len(panels) + 0.6)
    look = styles(list(groups))
    sizes_of = {v: sorted({r.ensemble_size for r in rs}) for v, rs in groups.items()}
    single = one_seed([[r for r in rs if r.ensemble_size == m] for v, rs in groups.items() for m in sizes_of[v]])
    for ax, (name, key) in zip(axes[0], panels):
        drawn = []
        for v, rs in groups.items():
            sizes = sizes_of[v]
            mean, std = _mean_std([metric_stat([r for r in rs if r.ensemble_size == m], key) for m in sizes], 1.0)
            ax.fill_between(
                sizes,
                [a - b for a, b in zip(mean, std)],
                [a + b for a, b in zip(mean, std)],
                color=look[v][0],
                alpha=0.2,
                lw=0,
            )
            ax.plot(sizes, mean, "o-", color=look[v][0])
            ax.set_xticks(sizes)
            drawn += mean
        if single:
            at_least(ax, drawn)
        ax.set_title(name)
        ax.set_xlabel("Ensemble size")
        ax.set_ylabel("NLL ↓")
    fig.suptitle(title + (REGENERATED_NOTE if any(r.regenerated for r in runs) else ""))
    _legend_below(fig, list(groups), note=ONE_SEED if single else f"Lines: mean over seeds; bands {SPREAD}.")
    return fig


@style.styled
def diversity_figure(runs: list[Run], setting: Setting):
    """Input-gradient cosine distance and epistemic uncertainty against severity (appendix D.1). Neither is
    a score (more is not always better), so their titles carry no arrow."""
    metrics = [
        (label, m)
        for label, m in (
            ("Input-gradient cosine distance", "grad_cosine_distance"),
            ("Epistemic uncertainty", "epistemic"),
        )
        if any(r.metric(f"test/{m}") is not None for r in runs)
    ]
    if not metrics:
        raise Skip("no gradient-diversity or epistemic-uncertainty results")
    xs = severities(runs)
    groups = by_variant(runs)
    look, single = styles(list(groups)), one_seed(groups)
    width = 0.8 / len(groups)
    fig, axes = style.figure(len(metrics), height=2.0)
    for ax, (label, metric) in zip(axes[0], metrics):
        for i, (v, rs) in enumerate(groups.items()):
            mean, std = _mean_std([metric_stat(rs, severity_key(metric, k)) for k in xs], 1.0)
            ax.bar(
                [x + (i - (len(groups) - 1) / 2) * width for x in xs],
                mean,
                width,
                yerr=None if single else std,
                color=look[v][0],
                error_kw={"elinewidth": 0.7, "capsize": 1.2, "ecolor": "0.55"},
            )
        ax.set_xticks(xs, ["clean" if k == 0 else str(k) for k in xs])
        ax.set_xlabel("Corruption severity")
        ax.set_title(label)
        ax.grid(axis="x", visible=False)
    fig.suptitle(_title(setting, runs))
    _legend_below(
        fig,
        list(groups),
        markers=False,
        note=spread_note(groups, f"Bars: mean over seeds; error bars {SPREAD} ({seeds_note(groups)})."),
    )
    return fig


def _pooled_reliability(runs: list[Run], key: str) -> tuple[list[float], list[float]] | None:
    """The reliability curve of a variant's runs pooled: per bin, the mean confidence and accuracy over every
    sample of every seed (the bins' counts add up)."""
    curves: list[dict] = [r.curves[key] for r in runs if r.curves.get(key)]
    if not curves:
        return None
    bins = len(curves[0]["count"])
    count = [sum(c["count"][b] for c in curves) for b in range(bins)]
    conf = [sum(c["count"][b] * (c["confidence"][b] or 0) for c in curves) for b in range(bins)]
    acc = [sum(c["count"][b] * (c["accuracy"][b] or 0) for c in curves) for b in range(bins)]
    kept = [b for b in range(bins) if count[b] > 0]
    return [conf[b] / count[b] for b in kept], [acc[b] / count[b] for b in kept]


@style.styled
def reliability_figure(runs: list[Run], setting: Setting):
    """Reliability diagrams of the test set per variant, before and after temperature scaling: accuracy against
    confidence per equal-width bin (15), every seed's samples pooled; the diagonal is perfect calibration."""
    groups = by_variant(runs)
    look = styles(list(groups))
    panels = [("reliability", "as trained"), ("ts/reliability", "temperature-scaled")]
    panels = [(k, t) for k, t in panels if any(_pooled_reliability(rs, k) for rs in groups.values())]
    if not panels:
        raise Skip("no reliability curves (results.json curves; written by runs evaluated since they were added)")
    fig, axes = style.figure(len(panels), height=2.3, sharey=True)
    for ax, (key, name) in zip(axes[0], panels):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        for v, rs in groups.items():
            curve = _pooled_reliability(rs, key)
            if curve is not None:
                ax.plot(*curve, color=look[v][0], marker=look[v][1], ms=2.5, lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Confidence", title=f"test set, {name}")
    axes[0][0].set_ylabel("Accuracy")
    fig.suptitle(_title(setting, runs))
    _legend_below(fig, list(groups), note="Bins of equal width; every seed's test samples pooled per bin.")
    return fig
