"""The final evaluation of a run (clean test and validation sets, every corrupted set the config asks for) and
`forde eval`: a finished run's checkpoint evaluated again, e.g. on more corruptions, into a file of its own."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from forde.atomic import unwritable, write_atomic
from forde.calibration import Temperature, fit_member_temperatures, fit_temperature, reliability_curve
from forde.config import ConfigError
from forde.data.corrupted import CorruptedSet, prepare_corrupted
from forde.data.corrupted import corrupted_sets as configured_corrupted_sets
from forde.data.ood_sets import check_ood_sets, ood_sets
from forde.distributed import ranks_from_env
from forde.evaluate import evaluate_corrupted, evaluate_ood, predictions_and_gradients
from forde.metrics import calibrated_log_probs, ensemble_log_probs, ensemble_metrics
from forde.names import RULE, is_path_component
from forde.provenance import run_provenance
from forde.run_dir import (
    CHECKPOINT,
    CONFIG,
    RESULTS,
    RUN_FILES,
    RunDirError,
    load_checkpoint,
    read_results,
    restore,
    run_record,
    to_json,
)
from forde.selective import risk_coverage_curve
from forde.setup import Setup, build

log = logging.getLogger(__name__)


CorruptedSets = Callable[[Setup], Iterable[CorruptedSet]]


def default_corrupted_sets(setup: Setup) -> Iterable[CorruptedSet]:
    """The corrupted sets `eval.corruptions` x `eval.severities` asks for (see forde.data.corrupted)."""
    return configured_corrupted_sets(setup.cfg, setup.dataset)


def temperature_of(setup: Setup, val_logits: torch.Tensor | None) -> Temperature | None:
    """The temperature fitted on the validation split's member logits (forde.calibration), where the run
    calibrates: with `eval.calibrate=true`, or by default whenever a validation split is held out; never on test.
    One for the ensemble's predictive, or one per member with `eval.calibrate_members`."""
    wanted, val = setup.cfg.eval.calibrate, setup.dataset.val
    if wanted is None and val is None:
        log.info("no validation split: metrics after temperature scaling need one (data.val_fraction=0.1)")
    if wanted is False or (wanted is None and val is None):
        return None
    if val is None or val_logits is None:
        raise ConfigError(calibrate_needs_validation(setup))
    if setup.cfg.eval.calibrate_members:
        return fit_member_temperatures(val_logits.log_softmax(-1), val.labels)
    return fit_temperature(ensemble_log_probs(val_logits.log_softmax(-1)), val.labels)


def calibrate_needs_validation(setup: Setup) -> str:
    return (
        f"eval.calibrate = true: temperature scaling is fitted on a validation split, and {setup.dataset.name} "
        "holds none out; set data.val_fraction=0.1 (or eval.calibrate=null to calibrate only where there is one)"
    )


def final_evaluation(setup: Setup, corrupted_sets: CorruptedSets = default_corrupted_sets) -> dict:
    """Clean test (and validation) metrics, every corruption x severity and every OOD set the config asks for;
    with a validation split, all of them once more after temperature scaling (`ts/`, `temperature`)."""
    ensemble, ctx, val, test = setup.ensemble, setup.eval_ctx, setup.dataset.val, setup.dataset.test
    if hasattr(setup.method, "sampler"):  # SWAG, node-BNN: every prediction averages the method's draws
        ctx = dataclasses.replace(ctx, sampler=setup.method.sampler(setup))
    val_logits, val_grads = predictions_and_gradients(ensemble, val, ctx) if val is not None else (None, None)
    temperature = temperature_of(setup, val_logits)  # one pass over the validation split serves both
    test_logits, grads = predictions_and_gradients(ensemble, test, ctx)
    test_lp = test_logits.log_softmax(-1)
    results: dict[str, Any] = {"test": ensemble_metrics(test_lp, test.labels, grads, temperature)}
    if val is not None and val_logits is not None:
        results["val"] = ensemble_metrics(val_logits.log_softmax(-1), val.labels, val_grads, temperature)
    if isinstance(temperature, torch.Tensor):
        results["member_temperatures"] = temperature.tolist()
    elif temperature is not None:
        results["temperature"] = temperature
    results["curves"] = {"test": curves(test_lp, test.labels, temperature)}
    sets = list(corrupted_sets(setup))
    if sets:
        main = setup.world is None or setup.world.is_main

        def bar(it):
            return tqdm(
                it, total=len(sets), desc="corrupted sets", leave=False, disable=not (setup.cfg.run.progress and main)
            )

        results["corrupted"] = evaluate_corrupted(ensemble, sets, ctx, progress=bar, temperature=temperature)
    ood = ood_sets(setup.cfg, setup.dataset)
    if ood:
        results["ood"] = evaluate_ood(ensemble, test_logits, ood, ctx, temperature)
    if ctx.sampler is not None:
        results["eval_samples"] = ctx.sampler.samples
    results["summary"] = flat_summary(results)
    results["provenance"] = run_provenance(setup.dataset, sets)
    return results


def curves(member_log_probs, labels, temperature: Temperature | None) -> dict:
    """The reliability diagram's and the risk-coverage curve's data, before (and after) temperature scaling."""
    lp = ensemble_log_probs(member_log_probs)
    out = {"reliability": reliability_curve(lp, labels), "risk_coverage": risk_coverage_curve(lp, labels)}
    if temperature is not None:
        lp_ts = calibrated_log_probs(member_log_probs, temperature)
        out["ts/reliability"] = reliability_curve(lp_ts, labels)
        out["ts/risk_coverage"] = risk_coverage_curve(lp_ts, labels)
    return out


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
    for name, vals in results.get("ood", {}).items():
        out.update({f"ood/{name}/{k}": v for k, v in vals.items()})
    if "temperature" in results:
        out["temperature"] = results["temperature"]
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


TRAINING_RECORD = ("train_time_s", "session_time_s", "processes")


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
    if out_name != out_name.strip():
        raise ConfigError(f"--out {out_name!r} starts or ends with a space; e.g. --out results-c.json")
    taken = {f.lower() for f in RUN_FILES}
    if out_name.lower() in taken or out_name.startswith("previous-") or (run_dir / out_name).is_dir():
        raise ConfigError(
            f"--out {out_name!r} would replace the run's own {run_dir / out_name}; name a new file, "
            "e.g. --out results-c.json"
        )
    if ranks_from_env() is not None:
        raise ConfigError(
            "forde eval runs as one process (it reads the one-process checkpoint every run writes); run it without "
            "torchrun or srun"
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
    if state["epoch"] < cfg.optim.epochs:
        log.warning(
            "%s holds epoch %d of %d: evaluating an unfinished run (train it to the end with forde train first "
            "for the final numbers)",
            run_dir / CHECKPOINT,
            state["epoch"],
            cfg.optim.epochs,
        )
    setup = build(cfg)
    restore(run_dir, setup.ensemble.load_state_dict, state["ensemble"])
    prepare_corrupted(cfg, setup.dataset)
    check_ood_sets(cfg, setup.dataset)  # a missing or unreadable OOD set: one line before evaluating
    trained = read_results(run_dir) or {}  # how the run was trained stays on record (times, processes)
    kept = {k: trained[k] for k in TRAINING_RECORD if k in trained}
    results = {**run_record(cfg, run_dir, state["epoch"]), **kept, **final_evaluation(setup)}
    write_atomic(run_dir / out_name, to_json(results))
    log.info("wrote %s: %s", run_dir / out_name, brief_summary(results["summary"]))
    return results
