"""Group runs into settings and variants, and summarise a metric over seeds (mean and std).

A seed is one sample: runs repeated at one seed (a re-run, a second copy of a trial) are averaged into one value
for that seed first, so a table's Seeds column, its standard deviations and the paired differences count seeds."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from forde.analysis.results import Run
from forde.analysis.variants import sort_key

K = TypeVar("K")

DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tinyimagenet": "TinyImageNet", "digits": "Digits"}
MODELS = {"resnet18": "ResNet18", "preact_resnet18": "PreActResNet18", "wrn16_4": "WideResNet16x4", "mlp": "MLP"}


@dataclass(frozen=True, order=True)
class Setting:
    """What makes runs comparable: the data, the architecture and the ensemble size."""

    dataset: str
    model: str
    ensemble_size: int
    arch: str = ""  # see Run.arch

    @property
    def title(self) -> str:
        model = MODELS.get(self.model, self.model) + (f" ({self.arch})" if self.arch else "")
        return f"{model} / {DATASETS.get(self.dataset, self.dataset)}, M = {self.ensemble_size}"

    @property
    def slug(self) -> str:
        arch = "".join(f"-{part.replace(' ', '')}" for part in self.arch.split(", ")) if self.arch else ""
        return f"{self.dataset}-{self.model}{arch}-M{self.ensemble_size}"


def setting_of(run: Run) -> Setting:
    return Setting(run.dataset, run.model, run.ensemble_size, run.arch)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1 denominator; 0 for a single seed) of n values."""

    mean: float
    std: float
    n: int


def stat(values: Iterable[float]) -> Stat | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


def group(runs: Iterable[Run], key: Callable[[Run], K]) -> dict[K, list[Run]]:
    out: dict[K, list[Run]] = defaultdict(list)
    for r in runs:
        out[key(r)].append(r)
    return dict(out)


def by_variant(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs per method variant, in the paper's order."""
    groups = group(runs, lambda r: r.variant)
    return {v: groups[v] for v in sorted(groups, key=sort_key)}


def seed_values(runs: Iterable[Run], value: Callable[[Run], float | None]) -> dict[int | str, float]:
    """One value per seed: the mean of `value` over that seed's runs that have it (a run of unknown seed is a
    seed of its own)."""
    per_seed: dict[int | str, list[float]] = defaultdict(list)
    for r in runs:
        v = value(r)
        if v is not None and not math.isnan(v):
            per_seed[r.seed_key].append(v)
    ordered = sorted(per_seed.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))
    return {seed: statistics.fmean(vs) for seed, vs in ordered}


def seed_count(runs: Iterable[Run]) -> int:
    return len({r.seed_key for r in runs})


def distinguish(runs: Iterable[Run]) -> None:
    """Runs of one setting and method variant whose configurations differ in more than their seed (a sweep's
    trials: other learning rates, epochs, bandwidths) are rows of their own: each gets the keys and values that
    set it apart (`Run.distinction`), so that no row averages runs of different recipes."""
    runs = list(runs)
    for r in runs:
        r.distinction = ""
    for same in group(runs, lambda r: (setting_of(r), r.variant)).values():
        recipes = {r.recipe for r in same}
        if len(recipes) < 2:
            continue
        keys = sorted({k for rec in recipes for k in dict(rec)})
        differing = [k for k in keys if len({dict(rec).get(k) for rec in recipes}) > 1]
        for r in same:
            mine = dict(r.recipe)
            r.distinction = ", ".join(f"{k}={mine.get(k, 'unset')}" for k in differing)


def metric_stat(runs: Iterable[Run], key: str) -> Stat | None:
    """Mean and std over seeds of a summary metric (n: the seeds that have it)."""
    return stat(seed_values(runs, lambda r: r.metric(key)).values())
