"""A study file: base training config, search space, objectives, sampler, pruner, budget.

    name: forde_cifar10
    base: cifar10                      # built-in config name or a YAML path (relative to this file)
    config: {optim: {epochs: 300}}     # overrides on top of the base
    n_trials: 40
    objectives: [{metric: val/nll, direction: minimize}]
    sampler: {name: tpe, seed: 0}
    pruner: {name: median, n_startup_trials: 5, n_warmup_steps: 30}
    search_space:
      ensemble_size: {choices: [5, 10]}                  # categorical
      method.alpha: {low: 0.0, high: 1.0}                # float (int when both bounds are ints)
      optim.lr: {low: 0.02, high: 0.2, log: true}
      method.bandwidth_scale: {low: 0.25, high: 4.0, log: true, when: {method.name: forde}}
      method.name: forde                                 # fixed value
    grid:                                                # optional: trials enqueued in this order
      - {method.name: [forde], method.alpha: [0.0, 0.4, 1.0], seed: [0, 1, 2]}

Everything is checked here, before any training: every key must exist in the training config,
every range must be non-empty, every grid point must be valid, every network a trial can get must build and map
a batch of the dataset's shape to logits (before the data is read), and no command-line override may set a key
the study searches (the sampler's value would silently replace it).
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import optuna
import yaml
from omegaconf import OmegaConf

from forde.config import (
    ConfigError,
    TrainConfig,
    identity,
    load_yaml,
    merge,
    read_config_yaml,
    to_train_config,
)
from forde.names import RULE, is_path_component
from forde.sweep.sampling import TrialSeededSampler
from forde.trust import refuse_code_from_file

SAMPLER_CLASSES: dict[str, type] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "grid": optuna.samplers.RandomSampler,
}
PRUNER_CLASSES: dict[str, type] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
}
SAMPLERS, PRUNERS = tuple(SAMPLER_CLASSES), tuple(PRUNER_CLASSES)
DIRECTIONS = ("minimize", "maximize")
Direction = Literal["minimize", "maximize"]


class StudyError(ConfigError):
    """A bad study file; raised before any trial starts."""


@dataclass
class Param:
    key: str
    kind: str  # float | int | categorical | fixed
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)
    value: Any = None
    when: dict[str, Any] = field(default_factory=dict)

    def active(self, chosen: dict[str, Any]) -> bool:
        return all(chosen.get(k) == v for k, v in self.when.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return self.loaded(trial.suggest_categorical(self.key, [self.stored(c) for c in self.choices]))
        low, high = self.bounds()
        if self.kind == "int":
            return trial.suggest_int(self.key, int(low), int(high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, low, high, step=self.step, log=self.log)

    def stored(self, value: Any) -> Any:
        """A value as Optuna stores it: a list or mapping choice by its flow-style YAML, as Optuna's categorical
        distributions hold only None, bool, int, float and str."""
        return _yaml_value(value) if self.kind == "categorical" and isinstance(value, (list, dict)) else value

    def loaded(self, stored: Any) -> Any:
        """The choice a value from Optuna stands for (the inverse of `stored`)."""
        return next((c for c in self.choices if isinstance(stored, str) and self.stored(c) == stored), stored)

    def bounds(self) -> tuple[float, float]:
        """low and high of an int or float range (_parse_param sets both for those kinds)."""
        if self.low is None or self.high is None:
            raise TypeError(f"search_space.{self.key} is a {self.kind} parameter, not a range")
        return self.low, self.high

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can get: both ends of a range, every choice."""
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "categorical":
            return list(self.choices)
        low, high = self.bounds()
        return [int(low), int(high)] if self.kind == "int" else [low, high]

    def representative(self) -> Any:
        return self.extremes()[0]

    def contains(self, value: Any) -> bool:
        if self.kind == "fixed":
            return value == self.value
        if self.kind == "categorical":
            return value in self.choices
        return self.low <= value <= self.high


@dataclass
class Objective:
    metric: str
    direction: Direction  # checked by read_study


@dataclass
class Study:
    name: str
    path: Path | None
    base: Any  # DictConfig: base config + study overrides
    params: list[Param]
    objectives: list[Objective]
    n_trials: int
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    grid: list[dict[str, Any]]

    @property
    def directions(self) -> list[Direction]:
        return [o.direction for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def samples(self) -> bool:
        """Whether new configurations are sampled once the grid (if any) is started; a grid study only runs its grid."""
        return self.sampler.get("name", "tpe") != "grid"

    @property
    def size(self) -> int:
        """How many configurations the study runs: n_trials, or fewer when a grid study's grid is smaller."""
        return self.n_trials if self.samples else min(self.n_trials, len(self.grid))

    def stored(self, point: dict[str, Any]) -> dict[str, Any]:
        """A grid point as Optuna stores its parameters (see Param.stored)."""
        by_key = {p.key: p for p in self.params}
        return {k: by_key[k].stored(v) if k in by_key else v for k, v in point.items()}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sampled (or enqueued) values for every active key, conditions resolved in file order."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.active(chosen):
                chosen[p.key] = p.suggest(trial)
        return chosen

    def trial_config(self, params: dict[str, Any], extra: list[str] | None = None) -> TrainConfig:
        dotted = [f"{k}={_yaml_value(v)}" for k, v in params.items()]
        return to_train_config(merge(self.base, dotted + (extra or [])))

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        """The study's sampler, drawing each trial with a seed of its own (see forde.sweep.sampling). A grid study's
        trials all come from its `grid` (queued): its random sampler is never consulted."""
        kw = sampler_options(self.sampler)
        cls = SAMPLER_CLASSES[self.sampler.get("name", "tpe")]
        return TrialSeededSampler(lambda seed: cls(seed=seed, **kw), self.sampler.get("seed"))

    def settings(self) -> dict[str, Any]:
        """What every trial shares (base config, study overrides, command-line overrides) as flat keys, without
        the searched keys, paths and run options: a re-launch must match it to continue the study."""
        searched = {p.key for p in self.params}
        cfg = self.trial_config({p.key: p.representative() for p in self.params if not p.when})
        return {k: v for k, v in identity(cfg).items() if k not in searched}

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if self.multi_objective:
            return optuna.pruners.NopPruner()
        return PRUNER_CLASSES[self.pruner.get("name", "none")](**pruner_options(self.pruner))

    @property
    def prune_metric(self) -> str | None:
        """The per-epoch metric reported to the pruner (same direction as the objective)."""
        if self.multi_objective or self.pruner.get("name", "none") == "none":
            return None
        return self.pruner.get("metric", self.objectives[0].metric)


def sampler_options(sampler: dict[str, Any]) -> dict[str, Any]:
    """The sampler's own options: the study file's `sampler:` but its name and seed (the seed is per trial)."""
    kw = {k: v for k, v in sampler.items() if k not in ("name", "seed")}
    if sampler.get("name", "tpe") == "tpe":
        kw.setdefault("constant_liar", True)  # parallel workers: running trials count as (pessimistic) results
    return kw


def pruner_options(pruner: dict[str, Any]) -> dict[str, Any]:
    """The pruner's own options: the study file's `pruner:` but its name and the metric it prunes on."""
    return {k: v for k, v in pruner.items() if k not in ("name", "metric")}


def _check_options(study: str, what: str, cls: type, options: dict[str, Any]) -> None:
    """Each option is a keyword argument `cls` takes, of the type of its default (Optuna would raise a TypeError at
    the first trial, after the storage was made), and `cls` accepts them all."""
    params = {
        k: p
        for k, p in inspect.signature(cls).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k != "seed"
    }
    for key, value in options.items():
        if key not in params:
            known = f"its options: {', '.join(params)}" if params else "it takes none"
            _fail(study, f"{what}: {cls.__name__} has no option '{key}'; {known}")
        if callable(params[key].default) or "Callable" in str(params[key].annotation):
            _fail(study, f"{what}.{key}: {cls.__name__} takes a Python function there, which a study file cannot give")
        default = params[key].default
        expected = (
            (bool,)
            if isinstance(default, bool)
            else (int,)
            if isinstance(default, int)
            else (int, float)
            if isinstance(default, float)
            else (str,)
            if isinstance(default, str)
            else None
        )
        if expected and (not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected)):
            _fail(study, f"{what}.{key} = {value!r}: expected {' or '.join(t.__name__ for t in expected)}")
    try:
        cls(**options)
    except (TypeError, ValueError) as err:
        _fail(study, f"{what}: {cls.__name__} refuses {options}: {str(err).splitlines()[0]}")


def _yaml_value(v: Any) -> str:
    """A value as the right-hand side of a dotted override: lists and mappings in flow style, `[64, 64]`."""
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True, width=math.inf).strip()
    if v is None:
        return "null"
    return str(v)


def _fail(study: str, msg: str) -> NoReturn:
    raise StudyError(f"study '{study}': {msg}")


def _parse_param(study: str, key: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        return Param(key, "fixed", value=spec)
    spec = dict(spec)
    when = spec.pop("when", {}) or {}
    allowed = {"low", "high", "log", "step", "choices", "value", "type"}
    unknown = set(spec) - allowed
    if unknown:
        _fail(
            study, f"search_space.{key}: unknown field(s) {sorted(unknown)}; use low/high/log/step, choices, or value"
        )
    if "value" in spec:
        return Param(key, "fixed", value=spec["value"], when=when)
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            _fail(study, f"search_space.{key}: choices must be a non-empty list")
        param = Param(key, "categorical", choices=list(spec["choices"]), when=when)
        stored = [param.stored(c) for c in param.choices if isinstance(c, (list, dict))]
        clash = next((c for c in param.choices if isinstance(c, str) and c in stored), None)
        if clash is not None:
            _fail(study, f"search_space.{key}: the choice {clash!r} is stored as the list or mapping {clash}; drop one")
        return param
    if "low" not in spec or "high" not in spec:
        _fail(study, f"search_space.{key}: give low and high, or choices, or value")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        _fail(study, f"search_space.{key}: low and high must be numbers, got {low!r} and {high!r}")
    if not (low < high) or not math.isfinite(low) or not math.isfinite(high):
        _fail(study, f"search_space.{key}: empty range [{low}, {high}]; need low < high")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        _fail(study, f"search_space.{key}: a log range needs low > 0, got {low}")
    kind = spec.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) else "float")
    if kind not in ("int", "float"):
        _fail(study, f"search_space.{key}: type must be int or float, got {kind!r}")
    return Param(key, kind, low=low, high=high, log=log, step=spec.get("step"), when=when)


def _expand_grid(study: str, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    points = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or not block:
            _fail(study, f"grid[{i}] must be a non-empty mapping of key -> list of values")
        keys = list(block)
        values = [v if isinstance(v, list) else [v] for v in block.values()]
        if any(not v for v in values):
            _fail(study, f"grid[{i}]: every key needs at least one value")
        points += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    return points


def read_study(
    source: str | Path, overrides: list[str] | None = None, trust_code: bool = False, build: bool = True
) -> Study:
    """The study in `source`, checked; `trust_code` (`--trust-code`) lets it name code to run as a network
    (forde.trust.code_from_file): without it, a study that does is refused before any network is built.
    `build=False` reads the file only (`--status`): no trial's config is built, no network imported."""
    path = Path(source)
    if not path.exists():
        _fail(str(source), f"no study file at {path}")
    raw = OmegaConf.to_container(load_yaml(path, "study file"), resolve=False)
    if not isinstance(raw, dict):
        _fail(str(source), f"{path} must be a mapping of study keys (base, search_space, objectives, ...)")
    name = raw.pop("name", path.stem)
    if not is_path_component(name):
        _fail(str(source), f"name = {name!r} {RULE}: it names the study's folder under --out; set e.g. name: my_study")
    known = {
        "name",
        "base",
        "config",
        "n_trials",
        "objectives",
        "sampler",
        "pruner",
        "search_space",
        "grid",
        "description",
    }
    unknown = set(raw) - known
    if unknown:
        _fail(name, f"unknown top-level key(s) {sorted(unknown)}; known: {sorted(known)}")

    base_src = raw.get("base")
    if base_src is not None:
        local = path.parent / str(base_src)
        base_src = local if local.exists() else base_src
    try:
        base = read_config_yaml(base_src) if base_src is not None else None
    except ConfigError as err:
        _fail(name, f"base: {err}")
    try:
        base = merge(base, raw.get("config") or {}, overrides or [])
    except ConfigError as err:
        _fail(name, f"config: {err}")

    params = [_parse_param(name, k, v) for k, v in (raw.get("search_space") or {}).items()]
    searched = {p.key for p in params}
    for o in overrides or []:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in searched:
            _fail(
                name,
                f"the override {o} sets {key}, which this study searches (search_space.{key}): the sampler's "
                f"value would replace it. Remove the override, or fix the value in a copy of the study file "
                f"(search_space: {{{key}: {o.split('=', 1)[1] if '=' in o else '...'}}})",
            )
    objectives = [Objective(o.get("metric"), o.get("direction")) for o in raw.get("objectives") or []]
    if not objectives:
        _fail(name, "objectives: give at least one {metric: ..., direction: minimize|maximize}")
    for objective in objectives:
        if objective.direction not in DIRECTIONS:
            _fail(
                name,
                f"objective {objective.metric}: direction must be minimize or maximize, got {objective.direction!r}",
            )
    for key in ("sampler", "pruner"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            _fail(
                name,
                f"{key}: expected a mapping such as {{name: {SAMPLERS[0] if key == 'sampler' else 'median'}}}, "
                f"got {raw[key]!r}",
            )
    sampler = dict(raw.get("sampler") or {"name": "tpe"})
    pruner = dict(raw.get("pruner") or {"name": "none"})
    if sampler.get("name", "tpe") not in SAMPLERS:
        _fail(name, f"sampler.name must be one of {SAMPLERS}, got {sampler.get('name')!r}")
    if pruner.get("name", "none") not in PRUNERS:
        _fail(name, f"pruner.name must be one of {PRUNERS}, got {pruner.get('name')!r}")
    if not isinstance(sampler.get("seed", 0), int) or isinstance(sampler.get("seed"), bool):
        _fail(name, f"sampler.seed = {sampler['seed']!r}: expected an integer (or no seed)")
    _check_options(name, "sampler", SAMPLER_CLASSES[sampler.get("name", "tpe")], sampler_options(sampler))
    _check_options(name, "pruner", PRUNER_CLASSES[pruner.get("name", "none")], pruner_options(pruner))
    grid = _expand_grid(name, raw.get("grid") or [])
    if sampler.get("name") == "grid" and not grid:
        _fail(name, "sampler grid needs a `grid:` list of points")
    n_trials = raw.get("n_trials", len(grid) or None)
    if not isinstance(n_trials, int) or n_trials < 1:
        _fail(name, f"n_trials must be a positive integer, got {n_trials!r}")
    study = Study(name, path, base, params, objectives, n_trials, sampler, pruner, grid)
    if build:
        check_study(study, overrides or [], trust_code)
    return study


def check_study(study: Study, overrides: list[str], trust_code: bool) -> None:
    """Build the training config of a representative point, of both ends of every range and of every grid point:
    any bad key or value, any objective the config cannot produce, and any network that does not build or does not
    map the dataset's inputs to logits fails here."""
    by_key = {p.key: p for p in study.params}
    for p in study.params:
        for k in p.when:
            if k not in by_key:
                _fail(study.name, f"search_space.{p.key}: condition on '{k}', which is not in the search space")
    probe = _point(study, {})
    networks: dict[str, TrainConfig] = {}  # where a config came from -> its config, for the model check below
    try:  # what the search space does not touch: base config, study and command-line overrides
        networks["config"] = study.trial_config(probe)
    except ConfigError as err:
        named = [k for k in by_key if f"{k} " in str(err) or f"'{k}'" in str(err)]
        _fail(study.name, f"search_space.{named[0]}: {err}" if named else f"config: {err}")
    for p in study.params:
        for value in p.extremes():
            point = {**_point(study, {**p.when, p.key: value}), p.key: value, **p.when}
            try:
                networks[f"search_space.{p.key}={value!r}"] = study.trial_config(point)
            except ConfigError as err:
                _fail(study.name, f"search_space.{p.key}: {err}")
    for point in study.grid:
        for k, v in point.items():
            if k not in by_key:
                _fail(study.name, f"grid point {point}: '{k}' is not in the search space; add it there")
            if not by_key[k].contains(v):
                _fail(study.name, f"grid point {point}: {k}={v!r} is outside its search-space range")
        try:
            networks[f"grid point {point}"] = study.trial_config(_point(study, point))
        except ConfigError as err:
            _fail(study.name, f"grid point {point}: {err}")
    cfg = networks["config"]
    for o in study.objectives:
        _check_metric(study.name, o.metric, cfg)
        if o.metric.endswith("grad_cosine_distance"):
            _check_gradient_diversity(study, o.metric, cfg)
    if study.prune_metric:
        _check_metric(study.name, study.prune_metric, cfg, per_epoch=True)
    _check_networks(study, networks, None if trust_code else overrides)


def _point(study: Study, given: dict[str, Any]) -> dict[str, Any]:
    """The values a trial gets when `given` are chosen (a grid point, or one value under its condition): every
    parameter active under them, resolved in file order as `Study.suggest` does, at its given or representative
    value; e.g. the fixed settings a grid point's method brings with it."""
    chosen: dict[str, Any] = {}
    for p in study.params:
        if p.active(chosen):
            chosen[p.key] = given.get(p.key, p.representative())
    return chosen


def _check_networks(study: Study, configs: dict[str, TrainConfig], untrusted: list[str] | None) -> None:
    """Every distinct network a trial can get (model settings and dataset) builds and maps a batch of the dataset's
    shape to logits, before any data is read (forde.models.check_model). `untrusted`: the command-line overrides
    when the study file is not trusted: a network it names as code is refused before any is built."""
    from forde.data.registry import input_spec
    from forde.models import check_model

    name = study.name
    if untrusted is not None:
        for where, cfg in configs.items():
            try:
                refuse_code_from_file(str(study.path or name), cfg.model, untrusted)
            except ConfigError as err:
                _fail(name, f"{where}: {err}")
    checked = set()
    for where, cfg in configs.items():
        key = (repr(cfg.model), cfg.data.name, cfg.data.root)
        if key in checked:
            continue
        checked.add(key)
        try:
            check_model(cfg.model, *input_spec(cfg.data), cfg.data.name)
        except ConfigError as err:
            _fail(name, f"{where}: {err}")


PREDICTIVE = ("accuracy", "nll", "ece", "brier", "adaptive_ece", "mce", "entropy", "aurc", "augrc")
LEAVES = (*PREDICTIVE, "epistemic", "grad_cosine_distance")


def _check_metric(name: str, metric: str, cfg: TrainConfig, per_epoch: bool = False) -> None:
    """A metric a trial will report: val/, test/, corrupted/[severity_k/] or ood/SET/, with ts/ (after temperature
    scaling) before a predictive metric or an OOD score that scaling changes."""
    from forde.data.ood_names import OOD_SETS
    from forde.ood import DETECTION, SCORES

    split, _, rest = metric.partition("/")
    if per_epoch and split not in ("val", "test"):
        _fail(name, f"pruner.metric '{metric}' is only known at the end; prune on a val/ or test/ metric")
    if split == "val" and cfg.data.val_fraction <= 0:
        _fail(name, f"metric '{metric}' needs a validation split: set config.data.val_fraction (e.g. 0.1)")
    if split == "ood":
        ood_set, _, leaf = rest.partition("/")
        if ood_set not in cfg.eval.ood:
            _fail(name, f"metric '{metric}' needs the OOD set '{ood_set}' in eval.ood (sets: {', '.join(OOD_SETS)})")
        known = [f"{d}_{s}" for d in DETECTION for s in SCORES] + [
            f"ts/{d}_{s}" for d in DETECTION for s in ("msp", "entropy")
        ]
    elif split in ("val", "test", "corrupted"):
        if split == "corrupted" and cfg.eval.corruptions == ["none"]:
            _fail(name, f"metric '{metric}' needs corrupted evaluation, but eval.corruptions is [none]")
        leaf = rest.split("/", 1)[1] if split == "corrupted" and rest.startswith("severity_") else rest
        known = [*LEAVES, *(f"ts/{k}" for k in PREDICTIVE)]
    else:
        _fail(name, f"metric '{metric}' must start with val/, test/, corrupted/ or ood/")
    if leaf.startswith("ts/") and per_epoch:
        _fail(name, f"pruner.metric '{metric}' is only known at the end (temperature scaling follows training)")
    if leaf.startswith("ts/") and cfg.eval.calibrate is False:
        _fail(name, f"metric '{metric}' needs temperature scaling, but eval.calibrate is false")
    if leaf.startswith("ts/") and cfg.eval.calibrate is None and cfg.data.val_fraction <= 0:
        _fail(name, f"metric '{metric}' needs temperature scaling on a validation split: set config.data.val_fraction")
    if leaf not in known:
        _fail(name, f"metric '{metric}': unknown metric '{leaf}'; known: {', '.join(known)}")


def _check_gradient_diversity(study: Study, metric: str, cfg: TrainConfig) -> None:
    """Gradient diversity needs two members and gradient samples in every trial."""
    if cfg.eval.grad_samples <= 0:
        _fail(study.name, f"objective '{metric}' needs eval.grad_samples > 0 (input gradients to compare)")
    searched = next((p for p in study.params if p.key == "ensemble_size"), None)
    smallest = min(searched.extremes()) if searched else cfg.ensemble_size
    if smallest < 2:
        where = "search_space.ensemble_size" if searched else "ensemble_size"
        _fail(
            study.name,
            f"{where}: an ensemble of {smallest} member has no gradient diversity, which objective "
            f"'{metric}' measures; use ensembles of 2 or more members",
        )
