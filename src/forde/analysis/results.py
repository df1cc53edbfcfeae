"""Finished runs as one flat list of `Run` records, whatever their source.

Sources, in order of authority:
  - run directories (`results.json` + `config.yaml`), found anywhere below a folder: the record;
  - an Optuna storage (SQLite file, PostgreSQL URL or journal:PATH): each trial's user_attrs `run_dir`
    (opened when it still exists) and `summary` (used when it does not), with the sampled `params`;
  - the W&B public API: each run's config and summary (needs network access and a login).
Config files are read as plain YAML, not validated: old runs stay readable when the schema grows.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from forde.analysis.variants import variant

log = logging.getLogger(__name__)

RESULTS, CONFIG = "results.json", "config.yaml"
ARCHIVE = re.compile(r"previous-\d+")  # where `run.restart=true` moves a run directory's earlier attempt


@dataclass
class Run:
    method: str
    dataset: str
    model: str
    seed: int | None  # None where the source does not say: such a run is a sample of its own, paired with none
    ensemble_size: int
    alpha: float | None  # FoRDE's lengthscale mix; None for the other methods
    summary: dict[str, float]  # flat: test/accuracy, corrupted/severity_4-5/nll, ...
    per_set: list[dict] = field(default_factory=list)  # one row per corruption x severity, when known
    source: str = ""  # run directory, optuna:<study>#<trial>, or wandb:<path>
    arch: str = ""  # what sets the network apart from the paper's of the same name, e.g. "width 16, blocks 1-1-1-1"
    seconds: dict[str, float] = field(default_factory=dict)  # "train", "eval": what the run took, when recorded
    recipe: tuple[tuple[str, str], ...] = ()  # the whole configuration but the seed: runs that differ only in
    # their seed are samples of one row; forde.analysis.aggregate.distinguish names rows whose recipes differ
    distinction: str = ""  # set by distinguish: what sets this run's recipe apart from others of its variant
    curves: dict = field(default_factory=dict)  # the test set's reliability and risk-coverage data, when recorded

    @property
    def variant(self) -> str:
        """The row this run belongs to: its method variant, and what sets its recipe apart, if anything."""
        base = variant(self.method, self.alpha)
        return f"{base} [{self.distinction}]" if self.distinction else base

    @property
    def seed_key(self) -> int | str:
        """What pairs this run with others of the same seed: its seed, or its source when the seed is unknown."""
        return self.seed if self.seed is not None else f"unknown seed: {self.source}"

    @property
    def has_corrupted(self) -> bool:
        return self.metric("corrupted/accuracy") is not None

    @property
    def regenerated(self) -> bool | None:
        """Whether some corrupted set was generated here (None: not recorded, results from before provenance)."""
        count = self.metric("corrupted/regenerated_sets")
        return None if count is None else count > 0

    @property
    def set_mean_cece(self) -> bool:
        """Results written before cECE pooled each severity's sets: their corrupted/ece is the mean of the
        per-set ECEs (they lack corrupted/ece_set_mean, which newer results carry beside the pooled cECE)."""
        return self.has_corrupted and self.metric("corrupted/ece_set_mean") is None

    def metric(self, key: str) -> float | None:
        value = self.summary.get(key)
        return float(value) if isinstance(value, (int, float)) else None


def dig(tree: dict, key: str, default: Any = None) -> Any:
    """A dotted key from a flat ({"method.alpha": ..}) or nested ({"method": {"alpha": ..}}) dict."""
    if key in tree:
        return tree[key]
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def make_run(config: dict, summary: dict, per_set: list[dict] | None = None, source: str = "") -> Run:
    """A Run from a (flat or nested) config and a flat summary."""
    method = dig(config, "method.name", "unknown")
    alpha = dig(config, "method.alpha")
    seed = dig(config, "seed")
    return Run(
        method=method,
        dataset=dig(config, "data.name", "unknown"),
        model=dig(config, "model.name", "unknown"),
        seed=int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None,
        ensemble_size=int(dig(config, "ensemble_size") or 0),
        alpha=float(alpha) if method == "forde" and alpha is not None else None,
        summary=dict(summary),
        per_set=list(per_set or []),
        source=source,
        arch=architecture(config),
        recipe=recipe(config),
    )


NOT_RECIPE = ("seed", "eval", "data.max_image_pixels")  # what changes what is trained no more than paths do


def recipe(config: dict) -> tuple[tuple[str, str], ...]:
    """The configuration's flat `key, value` pairs that define what a run trains, but its seed: paths, run options,
    the evaluation settings (which change what is measured, not what is trained) and the settings of other methods
    left out. Keys the run's config lacks (added to the schema since) take their defaults, so that old and new runs
    of one recipe are one row."""
    from forde.config import METHOD_KEYS, NOT_IDENTITY, TrainConfig, to_dict

    skipped = (*NOT_IDENTITY, *NOT_RECIPE)

    def flatten(node: Any, prefix: str = "") -> dict[str, str]:
        flat: dict[str, str] = {}
        for k, v in node.items():
            key = f"{prefix}{k}"
            if key in skipped or any(key.startswith(f"{n}.") for n in skipped):
                continue
            flat.update(
                flatten(v, key + ".") if isinstance(v, dict) else {key: json.dumps(v, sort_keys=True, default=str)}
            )
        return flat

    flat = flatten(to_dict(TrainConfig())) | flatten(config)
    own = METHOD_KEYS.get(json.loads(flat.get("method.name", "null")) or "", ())
    return tuple(
        sorted((k, v) for k, v in flat.items() if not k.startswith("method.") or k == "method.name" or k[7:] in own)
    )


def architecture(config: dict) -> str:
    """A residual network's width and blocks per stage where they differ from the paper's (64; 2-2-2-2):
    runs of one model name with other sizes are other settings. Empty for the paper's sizes and MLPs."""
    if dig(config, "model.name") in (None, "mlp"):
        return ""
    width, blocks = dig(config, "model.width", 64), list(dig(config, "model.blocks", None) or [2, 2, 2, 2])
    parts = ([f"width {width}"] if width != 64 else []) + (
        ["blocks " + "-".join(map(str, blocks))] if blocks != [2, 2, 2, 2] else []
    )
    return ", ".join(parts)


def load_run_dir(path: str | Path) -> Run:
    """One run directory of `forde train`."""
    path = Path(path)
    results = json.loads((path / RESULTS).read_text())
    config: dict[Any, Any] = {}
    if (path / CONFIG).exists():
        loaded = OmegaConf.to_container(OmegaConf.load(path / CONFIG))
        if not isinstance(loaded, dict):
            raise ValueError(f"{path / CONFIG} holds a {type(loaded).__name__}, not a mapping of config keys")
        config = loaded
    for key, dotted in (("method", "method.name"), ("dataset", "data.name")):  # results.json is the fallback
        if dig(config, dotted) is None and key in results:
            config[dotted] = results[key]
    for key in ("seed", "ensemble_size"):
        config.setdefault(key, results.get(key))
    per_set = results.get("corrupted", {}).get("per_set", [])
    run = make_run(config, results.get("summary", {}), per_set, source=str(path))
    run.seconds = {k: float(results[f"{k}_time_s"]) for k in ("train", "eval") if f"{k}_time_s" in results}
    curves = results.get("curves", {}).get("test")
    run.curves = curves if isinstance(curves, dict) else {}
    return run


def find_runs(folder: str | Path) -> list[Run]:
    """Every run directory with a results.json anywhere below `folder`, in path order; earlier attempts that
    `run.restart=true` archived in RUN/previous-N/ are not runs of their own and are left out."""
    folder, runs, archived = Path(folder), [], 0
    for results in sorted(folder.rglob(RESULTS)):
        if any(ARCHIVE.fullmatch(part) for part in results.parent.relative_to(folder).parts):
            archived += 1
            continue
        try:
            runs.append(load_run_dir(results.parent))
        except (OSError, ValueError, KeyError) as err:
            log.warning(
                "skipping %s: %s is unreadable (%s); `forde eval %s` rewrites it from the checkpoint",
                results.parent,
                results.name,
                err,
                results.parent,
            )
    if archived:
        log.info("%s: left out %d archived attempt(s) in previous-N/ folders", folder, archived)
    return runs


def load_optuna(storage: str, study_name: str | None = None, base: Path | None = None) -> list[Run]:
    """Trials of one study (or of every study in the storage) that carry results.

    A trial's run directory is opened when it exists (relative paths are tried against `base`, then
    the working directory); otherwise its `summary` user_attr stands in, with the config read from the
    trial's params, then its `config_params` user_attr (every parameter the sweep set, fixed ones
    included), then the study's `settings` user_attr (what every trial of a sweep shares), then the
    study's other user_attrs. Keys they all lack read as "unknown".
    """
    runs = []
    for study in _studies(storage, study_name):
        name = study.study_name
        skipped, loaded = 0, set()
        for trial in study.get_trials(deepcopy=False):
            run_dir = _existing_run_dir(trial.user_attrs.get("run_dir"), base)
            if run_dir is not None:
                if run_dir.resolve() not in loaded:  # a stopped trial and its retries share one run directory
                    loaded.add(run_dir.resolve())
                    runs.append(load_run_dir(run_dir))
            elif isinstance(trial.user_attrs.get("summary"), dict):
                config = {
                    **study.user_attrs,
                    **study.user_attrs.get("settings", {}),
                    **trial.user_attrs.get("config_params", {}),
                    **trial.params,
                }
                runs.append(make_run(config, trial.user_attrs["summary"], source=f"optuna:{name}#{trial.number}"))
            else:
                skipped += 1
        if skipped:
            log.info("optuna study %s: %d trial(s) without results (pruned, failed or running)", name, skipped)
    return runs


def _existing_run_dir(run_dir: str | None, base: Path | None) -> Path | None:
    if not run_dir:
        return None
    candidates = [Path(run_dir)] if Path(run_dir).is_absolute() else [p / run_dir for p in (base, Path.cwd()) if p]
    return next((c for c in candidates if (c / RESULTS).exists()), None)


def load_wandb(path: str, filters: dict | None = None) -> list[Run]:  # pragma: no cover - needs network
    """Finished runs of a W&B project `entity/project`: config and flat summary (no per-corruption rows)."""
    import wandb

    runs = []
    for r in wandb.Api().runs(path, filters=filters or {"state": "finished"}):
        summary = {k: v for k, v in r.summary.items() if "/" in k and isinstance(v, (int, float))}
        runs.append(make_run(dict(r.config), summary, source=f"wandb:{'/'.join(r.path)}"))
    return runs


def _studies(storage: str, study_name: str | None = None) -> list:
    import optuna

    from forde.sweep.storage import SweepStorage

    backend = SweepStorage(storage).optuna
    names = [study_name] if study_name else optuna.get_all_study_names(backend)
    return [optuna.load_study(study_name=name, storage=backend) for name in names]


def optuna_studies(study_dir: str | Path, storage: str | None = None, study_name: str | None = None) -> list:
    """The Optuna studies of `storage` (default: the study.db or journal.log in `study_dir`), if any."""
    from forde.sweep.folder import find_url

    storage = storage or find_url(Path(study_dir))
    return _studies(storage, study_name) if storage else []


def study_runs(study_dir: str | Path, storage: str | None = None, study_name: str | None = None) -> list[Run]:
    """Run directories below `study_dir`, plus trials of its Optuna storage (default: the study.db or
    journal.log there) whose run directories are gone."""
    from forde.sweep.folder import find_url

    study_dir = Path(study_dir)
    runs = find_runs(study_dir)
    storage = storage or find_url(study_dir)
    if storage:
        seen = {Path(r.source).resolve() for r in runs}
        extra = [
            r
            for r in load_optuna(storage, study_name, base=study_dir)
            if r.source.startswith("optuna:") or Path(r.source).resolve() not in seen
        ]
        runs += extra
        log.info(
            "%s: %d run directories, %d more runs from the Optuna storage",
            study_dir,
            len(runs) - len(extra),
            len(extra),
        )
    return runs
