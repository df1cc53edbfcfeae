"""The final evaluation of a run (clean test and validation sets, every corrupted set the config asks for) and
`forde eval`: a finished run's checkpoint evaluated again, e.g. on more corruptions, into a file of its own."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from forde.atomic import unwritable, write_atomic
from forde.config import ConfigError
from forde.data.corrupted import CorruptedSet, prepare_corrupted
from forde.data.corrupted import corrupted_sets as configured_corrupted_sets
from forde.evaluate import evaluate_corrupted, evaluate_split
from forde.names import RULE, is_path_component
from forde.provenance import run_provenance
from forde.run_dir import (
    CHECKPOINT,
    CONFIG,
    RESULTS,
    RUN_FILES,
    RunDirError,
    load_checkpoint,
    restore,
    run_record,
    to_json,
)
from forde.setup import Setup, build

log = logging.getLogger(__name__)


CorruptedSets = Callable[[Setup], Iterable[CorruptedSet]]


def default_corrupted_sets(setup: Setup) -> Iterable[CorruptedSet]:
    """The corrupted sets `eval.corruptions` x `eval.severities` asks for (see forde.data.corrupted)."""
    return configured_corrupted_sets(setup.cfg, setup.dataset)


def final_evaluation(setup: Setup, corrupted_sets: CorruptedSets = default_corrupted_sets) -> dict:
    """Clean test (and validation) metrics and every corruption x severity the config asks for."""
    results: dict[str, Any] = {"test": evaluate_split(setup.ensemble, setup.dataset.test, setup.eval_ctx)}
    if setup.dataset.val is not None:
        results["val"] = evaluate_split(setup.ensemble, setup.dataset.val, setup.eval_ctx)
    sets = list(corrupted_sets(setup))
    if sets:

        def bar(it):
            return tqdm(it, total=len(sets), desc="corrupted sets", leave=False, disable=not setup.cfg.run.progress)

        results["corrupted"] = evaluate_corrupted(setup.ensemble, sets, setup.eval_ctx, progress=bar)
    results["summary"] = flat_summary(results)
    results["provenance"] = run_provenance(setup.dataset, sets)
    return results


def flat_summary(results: dict) -> dict:
    """The headline numbers under flat keys: what sweeps optimise and trackers show.

    `corrupted/regenerated_sets` counts the corrupted sets generated here rather than read from the
    official files (absent when some set's source is unknown)."""
    out = {
        f"{split}/{k}": v
        for split in ("test", "val")
        for k, v in results.get(split, {}).items()
        if not isinstance(v, list)
    }
    for group, vals in results.get("corrupted", {}).get("summary", {}).items():
        prefix = "corrupted" if group == "all" else f"corrupted/{group}"
        out.update({f"{prefix}/{k}": v for k, v in vals.items()})
    rows = results.get("corrupted", {}).get("per_set", [])
    if rows and all(r.get("source") in ("generated", "official") for r in rows):
        out["corrupted/regenerated_sets"] = sum(r["source"] == "generated" for r in rows)
    return out


def brief_summary(summary: dict) -> str:
    keys = ("test/accuracy", "test/nll", "test/ece", "corrupted/accuracy", "corrupted/nll", "corrupted/ece")
    return "  ".join(f"{k} {summary[k]:.4f}" for k in keys if k in summary)


EVAL_OVERRIDABLE = (
    "eval.",
    "device",
    "precision",
    "channels_last",
    "cuda.",
    "model.execution",
    "run.progress",
    "data.root",
)


def evaluate_run(
    run_dir: Path, overrides: list[str] | None = None, out_name: str = RESULTS, trust_code: bool = False
) -> dict:
    """Re-evaluate a run directory's checkpoint (e.g. on more corruptions) and write `out_name` there (results.json
    by default: the final evaluation, replaced). `trust_code`: build a network its config.yaml names as code."""
    from forde.config import load_config

    if not is_path_component(out_name):
        raise ConfigError(
            f"--out {out_name!r} {RULE}: it names the file written in {run_dir}; e.g. --out results-c.json"
        )
    if out_name in RUN_FILES or (run_dir / out_name).is_dir():
        raise ConfigError(
            f"--out {out_name!r} would replace the run's own {run_dir / out_name}; name a new file, "
            "e.g. --out results-c.json"
        )
    overrides = overrides or []
    bad = [o for o in overrides if not o.startswith(EVAL_OVERRIDABLE)]
    if bad:
        raise ConfigError(f"forde eval accepts only {', '.join(EVAL_OVERRIDABLE)} overrides, got {bad}")
    if not (run_dir / CONFIG).exists():
        raise ConfigError(f"{run_dir / CONFIG} does not exist; is {run_dir} a run directory of `forde train`?")
    cfg = load_config(run_dir / CONFIG, overrides, trust_code=trust_code)
    state = load_checkpoint(run_dir)
    if state is None:
        raise ConfigError(f"{run_dir / CHECKPOINT} does not exist; is {run_dir} a run directory of `forde train`?")
    why = unwritable(run_dir)
    if why is not None:
        raise RunDirError(
            f"cannot write {run_dir / out_name} ({why}); make {run_dir} writable, or copy the run directory "
            "to a writable place and evaluate the copy"
        )
    setup = build(cfg)
    restore(run_dir, setup.ensemble.load_state_dict, state["ensemble"])
    prepare_corrupted(cfg, setup.dataset)
    results = {**run_record(cfg, run_dir, state["epoch"]), **final_evaluation(setup)}
    write_atomic(run_dir / out_name, to_json(results))
    log.info("wrote %s: %s", run_dir / out_name, brief_summary(results["summary"]))
    return results
