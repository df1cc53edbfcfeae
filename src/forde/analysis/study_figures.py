"""A view across a sweep, drawn by Optuna's matplotlib visualisations: optimization history, parameter
importances, parallel coordinates, slices, the pruner's learning curves, the timeline of trials (what ran
when and how it ended) and, for several objectives, the Pareto front. The best trial is marked where a
figure shows single trials. Each function returns a figure or raises `Skip` with the reason.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterator

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from forde.analysis.figures import Skip

BEST = {"marker": "*", "s": 160, "color": "#d62728", "edgecolor": "black", "linewidths": 0.6, "zorder": 10}


def _quiet(draw: Callable, *args, **kwargs):
    """Optuna's plots, without their experimental-feature warnings; their refusals become reasons to skip."""
    with warnings.catch_warnings():
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
        return f"best: trial {self.best.number} ({self.name} = {self.value(self.best):.4g})"


def _completed(opt: optuna.Study, at_least: int = 1) -> None:
    n = len(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < at_least:
        raise Skip(f"needs {at_least} completed trial{'s' if at_least > 1 else ''}, the study has {n}")


def _axes(result) -> list:
    return list(np.ravel(result)) if isinstance(result, np.ndarray) else [result]


def history_figure(opt: optuna.Study, objective: Objective):
    _completed(opt)
    ax = _quiet(optuna.visualization.matplotlib.plot_optimization_history, opt, **objective.kwargs)
    ax.scatter([objective.best.number], [objective.value(objective.best)], label=objective.label, **BEST)
    ax.legend(loc="best", fontsize=7)
    return ax.figure


def importance_figure(opt: optuna.Study, objective: Objective):
    _completed(opt, 2)
    ax = _quiet(optuna.visualization.matplotlib.plot_param_importances, opt, **objective.kwargs)
    ax.set_title(f"{ax.get_title()}\n{objective.label}", fontsize=8)
    return ax.figure


def parallel_figure(opt: optuna.Study, objective: Objective):
    _completed(opt)
    ax = _quiet(optuna.visualization.matplotlib.plot_parallel_coordinate, opt, **objective.kwargs)
    best = objective.value(objective.best)
    # Optuna draws one polyline per trial starting at its objective value: redraw the best one on top.
    for collection in ax.collections:
        for segment in getattr(collection, "get_segments", lambda: [])():
            if len(segment) and math.isclose(segment[0][1], best, rel_tol=1e-12, abs_tol=1e-12):
                ax.plot(segment[:, 0], segment[:, 1], color=BEST["color"], lw=2.5, zorder=10, label=objective.label)
                ax.legend(loc="upper right", bbox_to_anchor=(1.0, -0.15), fontsize=7, frameon=False)
                return ax.figure
    return ax.figure


def slice_figure(opt: optuna.Study, objective: Objective):
    _completed(opt)
    axes = _axes(_quiet(optuna.visualization.matplotlib.plot_slice, opt, **objective.kwargs))
    best = objective.best
    for ax in axes:
        param = ax.get_xlabel()
        if param in best.params:  # a categorical axis holds the choices' repr() as matplotlib categories
            categorical = isinstance(best.distributions[param], optuna.distributions.CategoricalDistribution)
            ax.scatter([repr(best.params[param]) if categorical else best.params[param]], [objective.value(best)], **BEST)
    axes[0].figure.suptitle(objective.label, fontsize=8)
    return axes[0].figure


def intermediate_figure(opt: optuna.Study, objective: Objective):
    if not any(t.intermediate_values for t in opt.get_trials(deepcopy=False)):
        raise Skip("no trial reported per-epoch values (the study has no pruner)")
    ax = _quiet(optuna.visualization.matplotlib.plot_intermediate_values, opt)
    best = objective.best
    if best is not None and best.intermediate_values:
        steps = sorted(best.intermediate_values)
        ax.plot(steps, [best.intermediate_values[s] for s in steps], color=BEST["color"], lw=2.5, zorder=10,
                label=f"best: trial {best.number}")
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
