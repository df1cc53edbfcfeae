"""A view across a sweep, drawn by Optuna's matplotlib visualisations: optimization history, parameter
importances, parallel coordinates, slices, the pruner's learning curves, the timeline of trials (what ran
when and how it ended) and, for several objectives, the Pareto front. The best trial is marked where a
figure shows single trials. A study that repeats configurations over seeds (a grid with `seed` in it) uses
the seed as a replicate, not a hyperparameter: importances and parallel coordinates leave it out and say so.
Each function returns a figure or raises `Skip` with the reason.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable, Iterator

import matplotlib.pyplot as plt
import numpy as np
import optuna
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from optuna.trial import FrozenTrial, TrialState

from forde.analysis.figures import Skip

BEST = {"marker": "*", "s": 160, "color": "#D55E00", "edgecolor": "black", "linewidths": 0.6, "zorder": 10}
SEED = "seed"


def _quiet(draw: Callable, *args, **kwargs):
    """Optuna's plots, without their experimental-feature warnings or offset notation on their axes (ticks that
    read "0.01" beside "+8.45e1"); their refusals become reasons to skip."""
    with warnings.catch_warnings(), plt.rc_context({"axes.formatter.useoffset": False}):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return draw(*args, **kwargs)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            raise Skip(f"Optuna could not draw it: {err}") from None


class Objective:
    """One objective of a study: its name, how to read it from a trial, and its best trial."""

    def __init__(self, opt: optuna.Study, index: int):
        self.index = index
        self.name = (opt.metric_names or [f"objective{i}" for i in range(len(opt.directions))])[index]
        self.multi = len(opt.directions) > 1
        done = [t for t in opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
        sign = 1 if opt.directions[index] == optuna.study.StudyDirection.MINIMIZE else -1
        self.best: FrozenTrial | None = min(done, key=lambda t: sign * t.values[index], default=None)

    def value(self, trial: FrozenTrial) -> float:
        return trial.values[self.index]

    @property
    def kwargs(self) -> dict:
        """Optuna's target arguments: needed only when the study has several objectives."""
        return {"target": self.value, "target_name": self.name} if self.multi else {"target_name": self.name}

    @property
    def label(self) -> str:
        return f"best: trial {self.completed_best.number} ({self.name} = {self.value(self.completed_best):.4g})"

    @property
    def completed_best(self) -> FrozenTrial:
        """The best trial, for the figures drawn only once the study has a completed trial (see _completed)."""
        if self.best is None:
            raise Skip("needs 1 completed trial, the study has 0")
        return self.best


def replicated_seeds(opt: optuna.Study) -> int:
    """How many configurations (every parameter but the seed) completed at two or more seeds: more than 0 means
    the seed repeats configurations, and its spread is noise between runs, not the effect of a setting."""
    seeds: dict[tuple, set] = {}
    for t in opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if SEED in t.params:
            config = tuple(sorted((k, repr(v)) for k, v in t.params.items() if k != SEED))
            seeds.setdefault(config, set()).add(t.params[SEED])
    return sum(len(s) > 1 for s in seeds.values())


def seed_note(opt: optuna.Study) -> str:
    repeated = replicated_seeds(opt)
    return f"{repeated} configurations ran at several seeds: {SEED} is noise, not a setting" if repeated else ""


def _hyperparameters(opt: optuna.Study) -> tuple[list[str] | None, str]:
    """The parameters to rank or draw (None: all of them) and a line saying what was left out."""
    note = seed_note(opt)
    if not note:
        return None, ""
    done = opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = sorted({k for t in done for k in t.params} - {SEED})
    if not names:
        raise Skip(f"the study varies only the {SEED}: no setting to rank or draw")
    return names, f"{SEED} left out ({note})"


def _completed(opt: optuna.Study, at_least: int = 1) -> None:
    n = len(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < at_least:
        raise Skip(f"needs {at_least} completed trial{'s' if at_least > 1 else ''}, the study has {n}")


def _axes(result) -> list:
    return list(np.ravel(result)) if isinstance(result, np.ndarray) else [result]


def history_figure(opt: optuna.Study, objective: Objective):
    _completed(opt)
    ax = _quiet(optuna.visualization.matplotlib.plot_optimization_history, opt, **objective.kwargs)
    ax.scatter(
        [objective.completed_best.number], [objective.value(objective.completed_best)], label=objective.label, **BEST
    )
    ax.legend(loc="best", fontsize=7)
    return ax.figure


def importance_figure(opt: optuna.Study, objective: Objective):
    _completed(opt, 2)
    params, left_out = _hyperparameters(opt)
    ax = _quiet(optuna.visualization.matplotlib.plot_param_importances, opt, params=params, **objective.kwargs)
    title = ax.get_title(loc="left")  # Optuna's title sits on the left: the lines below it go under it, not over it
    ax.set_title("\n".join([title, objective.label] + ([left_out] if left_out else [])), loc="left", fontsize=8)
    return ax.figure


def parallel_figure(opt: optuna.Study, objective: Objective):
    _completed(opt)
    params, left_out = _hyperparameters(opt)
    ax = _quiet(optuna.visualization.matplotlib.plot_parallel_coordinate, opt, params=params, **objective.kwargs)
    if left_out:
        ax.set_title("\n".join([ax.get_title(), *textwrap.wrap(left_out, 60)]), fontsize=9)  # within the figure
    ax.title.set_y(1.09)  # room for the best trial's legend under the title
    best = objective.value(objective.completed_best)
    # Optuna draws one polyline per trial starting at its objective value: redraw the best one on top, and name it
    # in a legend above the axes, clear of the rotated parameter names below them.
    for collection in ax.collections:
        for segment in getattr(collection, "get_segments", lambda: [])():
            if len(segment) and math.isclose(segment[0][1], best, rel_tol=1e-12, abs_tol=1e-12):
                ax.plot(segment[:, 0], segment[:, 1], color=BEST["color"], lw=2.5, zorder=10, label=objective.label)
                ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=7, frameon=False)
                return ax.figure
    return ax.figure


def slice_figure(opt: optuna.Study, objective: Objective):
    _completed(opt)
    axes = _axes(_quiet(optuna.visualization.matplotlib.plot_slice, opt, **objective.kwargs))
    best = objective.completed_best
    for ax in axes:
        _plain_log_ticks(ax)
        param = ax.get_xlabel()
        if param in best.params:  # a categorical axis holds the choices' repr() as matplotlib categories
            categorical = isinstance(best.distributions[param], optuna.distributions.CategoricalDistribution)
            ax.scatter(
                [repr(best.params[param]) if categorical else best.params[param]], [objective.value(best)], **BEST
            )
    axes[0].figure.suptitle("\n".join(filter(None, [objective.label, seed_note(opt)])), fontsize=8)
    return axes[0].figure


def _plain_log_ticks(ax) -> None:
    """A log-scaled parameter (a learning rate) ticked at 1, 2, 3 and 5 times powers of ten, written as plain numbers:
    Optuna labels every minor tick of an axis that spans less than a decade ("2×10⁻²"), and they overlap."""
    if ax.get_xscale() == "log":
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def intermediate_figure(opt: optuna.Study, objective: Objective):
    if not any(t.intermediate_values for t in opt.get_trials(deepcopy=False)):
        raise Skip("no trial reported per-epoch values (the study has no pruner)")
    ax = _quiet(optuna.visualization.matplotlib.plot_intermediate_values, opt)
    best = objective.best
    if best is not None and best.intermediate_values:
        steps = sorted(best.intermediate_values)
        ax.plot(
            steps,
            [best.intermediate_values[s] for s in steps],
            color=BEST["color"],
            lw=2.5,
            zorder=10,
            label=f"best: trial {best.number}",
        )
        ax.legend(loc="best", fontsize=7)
    return ax.figure


def timeline_figure(opt: optuna.Study):
    if not opt.get_trials(deepcopy=False):
        raise Skip("the study has no trials")
    return _quiet(optuna.visualization.matplotlib.plot_timeline, opt).figure


def pareto_figure(opt: optuna.Study):
    _completed(opt)
    return _quiet(optuna.visualization.matplotlib.plot_pareto_front, opt, target_names=opt.metric_names).figure


def study_figures(opt: optuna.Study) -> Iterator[tuple[str, Callable, tuple]]:
    """(file name, drawing function, its arguments) for every figure of a study."""
    objectives = [Objective(opt, i) for i in range(len(opt.directions))]
    for objective in objectives:
        suffix = "-" + objective.name.replace("/", "_").replace(" ", "_") if objective.multi else ""
        yield f"history{suffix}", history_figure, (opt, objective)
        yield f"importances{suffix}", importance_figure, (opt, objective)
        yield f"parallel{suffix}", parallel_figure, (opt, objective)
        yield f"slice{suffix}", slice_figure, (opt, objective)
    if len(objectives) == 1:
        yield "intermediate", intermediate_figure, (opt, objectives[0])
    else:
        yield "pareto", pareto_figure, (opt,)
    yield "timeline", timeline_figure, (opt,)
