"""Group runs into settings and variants, and summarise a metric over seeds (mean and std).

A seed is one sample: runs repeated at one seed (a re-run, a second copy of a trial) are averaged into one value
for that seed first, so a table's Seeds column, its standard deviations and the paired differences count seeds."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from forde.analysis.results import Run
from forde.analysis.variants import sort_key, variant

K = TypeVar("K")

DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tinyimagenet": "TinyImageNet", "digits": "Digits"}
MODELS = {"resnet18": "ResNet18", "preact_resnet18": "PreActResNet18", "wrn16_4": "WideResNet16x4", "mlp": "MLP"}
BY_DEPTH = {"resnet18": "ResNet", "preact_resnet18": "PreActResNet"}  # model.blocks sets their depth


def network(model: str, arch: str = "") -> str:
    """The network's usual name, one for each network: a CIFAR (PreAct)ResNet by its depth, a stem conv, two convs
    per basic block (both have only basic blocks) and the classifier, so blocks 1-1-1-1 is ResNet10 and the paper's
    2-2-2-2 ResNet18; then the width where it is not the paper's ("ResNet10, width 16"). `arch` as Run.arch says it."""
    parts = dict(part.partition(" ")[::2] for part in arch.split(", ")) if arch else {}
    name = MODELS.get(model, model)
    blocks = parts.get("blocks", "2-2-2-2").split("-")
    if model in BY_DEPTH and all(b.isdigit() for b in blocks):  # config files are not validated
        parts.pop("blocks", None)
        name = f"{BY_DEPTH[model]}{2 + 2 * sum(map(int, blocks))}"
    return ", ".join([name, *(f"{key} {value}" for key, value in parts.items())])


@dataclass(frozen=True, order=True)
class Setting:
    """What makes runs comparable: the data, the architecture and the ensemble size."""

    dataset: str
    model: str
    ensemble_size: int
    arch: str = ""  # see Run.arch

    @property
    def title(self) -> str:
        return f"{self.network} / {DATASETS.get(self.dataset, self.dataset)}, M = {self.ensemble_size}"

    @property
    def network(self) -> str:
        return network(self.model, self.arch)

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
    """Runs of one setting and method whose configurations differ in more than their seed (a sweep's trials: other
    learning rates, epochs, bandwidths) are rows of their own, each named by every key that varies between them
    (`Run.distinction`; FoRDE's alpha is in the variant's own label), so that no row averages runs of different
    recipes and no label hides a setting that varied beside alpha. Numbers are rounded to 3 significant digits, more
    where 3 would give two recipes one label."""
    runs = list(runs)
    for r in runs:
        r.distinction = ""
    for same in group(runs, lambda r: (setting_of(r), r.method)).values():
        recipes = {r.recipe: r for r in same}
        if len(recipes) < 2:
            continue
        keys = sorted({k for rec in recipes for k in dict(rec)})
        differing = [k for k in keys if len({dict(rec).get(k) for rec in recipes}) > 1]
        for digits in range(3, 18):
            shown = differing if digits > 3 else [k for k in differing if k != "method.alpha"]
            names = {rec: _distinction(dict(rec), shown, digits) for rec in recipes}
            if len({(variant(r.method, r.alpha), names[rec]) for rec, r in recipes.items()}) == len(recipes):
                break
        for r in same:
            r.distinction = names[r.recipe]


def _distinction(recipe: dict[str, str], keys: list[str], digits: int) -> str:
    """`key=value, ...` of a recipe (values as JSON), numbers that are not whole to `digits` significant digits."""

    def shown(text: str | None) -> str:
        if text is None:
            return "unset"
        value = json.loads(text)
        return f"{value:.{digits}g}" if isinstance(value, float) and not value.is_integer() else text

    return ", ".join(f"{k}={shown(recipe.get(k))}" for k in keys)


def metric_stat(runs: Iterable[Run], key: str) -> Stat | None:
    """Mean and std over seeds of a summary metric (n: the seeds that have it)."""
    return stat(seed_values(runs, lambda r: r.metric(key)).values())
