"""A run directory is the record of a run, and its files are read back with checks:
config.yaml     the resolved config
metrics.jsonl   one line per epoch (train and validation metrics)
checkpoint.pt   the last completed epoch: weights, optimizer, data order, RNG, history
checkpoint.prev.pt  the epoch before: resumed from when checkpoint.pt cannot be read
results.json    the final evaluation (clean test set and every corruption x severity)
previous-N/     the files of a run with another config that `run.restart=true` replaced
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forde.atomic import replace_atomic
from forde.config import ConfigError, TrainConfig, identity, identity_changes
from forde.errors import RunDirError, one_line
from forde.safe_load import UnsafePickleError, torch_load

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, PREVIOUS_CHECKPOINT)  # what a re-evaluation must never replace


def default_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.data.name}-{cfg.method.name}-M{cfg.ensemble_size}-seed{cfg.seed}"


def run_dir_of(cfg: TrainConfig) -> Path:
    return Path(cfg.run.out_dir) / (cfg.run.name or default_run_name(cfg))


def save_checkpoint(state: dict, run_dir: Path) -> None:
    """Write checkpoint.pt atomically and keep the one before as checkpoint.prev.pt."""
    replace_atomic(run_dir / CHECKPOINT, lambda fh: torch.save(state, fh), keep=run_dir / PREVIOUS_CHECKPOINT)


def load_checkpoint(run_dir: Path) -> dict | None:
    """The last checkpoint, or the one before when the last cannot be read (truncated by a copy, a full disk);
    None when the run has none. Loaded on the CPU: `load_state_dict` moves weights and optimizer state to
    their device, while RNG and generator states must stay CPU ByteTensors.

    Loaded with `weights_only=True`: a checkpoint holds tensors and plain values only (every format this
    project has written), so unpickling one never runs code. A file that holds anything else (a class, a
    function call) is refused, with no fallback to the checkpoint before: it was not written by a run."""
    unreadable = []
    for path in (run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT):
        if not path.exists():
            continue
        try:
            state = torch_load(path)
        except UnsafePickleError as err:
            raise RunDirError(
                f"{path} was not loaded: it holds {err.name or 'an object'}, not only tensors and plain values, and "
                "unpickling it could run code (checkpoints of forde runs never hold such objects). Delete it unless "
                f"you trust its origin; the run then resumes from {PREVIOUS_CHECKPOINT} or starts over"
            ) from None
        except Exception as err:  # a cut-short zip, a file of another kind: torch raises many types here
            unreadable.append(f"{path} is unreadable ({one_line(err)})")
            continue
        _check_state(path, state)
        if unreadable:
            log.warning("%s; resuming from %s (epoch %d)", unreadable[0], path.name, state["epoch"])
        return state
    if unreadable:
        raise RunDirError(
            f"{'; '.join(unreadable)}. To start this run over, move {run_dir} aside "
            f"(e.g. `mv {run_dir} {run_dir}.damaged`) and run again"
        )
    return None


CHECKPOINT_KEYS = {
    "epoch": int,
    "ensemble": dict,
    "optimizer": dict,
    "loader": dict,
    "torch_rng": torch.Tensor,
    "history": list,
}


def _check_state(path: Path, state: Any) -> None:
    """A loaded checkpoint has the entries `Trainer.state_dict` writes, of their types."""
    if not isinstance(state, dict):
        raise RunDirError(
            f"{path} holds a {type(state).__name__}, not a checkpoint of `forde train`; move it aside and run again"
        )
    wrong = [k for k, kind in CHECKPOINT_KEYS.items() if not isinstance(state.get(k), kind)]
    if "history" not in wrong and not all(isinstance(h, dict) and "train/epoch_time_s" in h for h in state["history"]):
        wrong.append("history")
    if wrong:
        raise RunDirError(
            f"{path} is not a checkpoint of `forde train` (missing or malformed: {', '.join(wrong)}); "
            "move it aside and run again"
        )


def restore(run_dir: Path, load: Callable[[Any], Any], state: Any) -> None:
    """`load(state)`; a checkpoint whose tensors do not fit the model and optimizer of config.yaml is one line."""
    try:
        load(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise RunDirError(
            f"the checkpoint in {run_dir} does not fit the model of {run_dir / CONFIG} "
            f"({one_line(err)}); move it aside and run again"
        ) from None


def read_results(run_dir: Path) -> dict | None:
    """results.json of a finished run; None when absent, or unreadable (then the final evaluation reruns)."""
    path = run_dir / RESULTS
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except ValueError as err:
        log.warning("%s is unreadable (%s); evaluating the last checkpoint again to rewrite it", path, err)
        return None
    summary = results.get("summary") if isinstance(results, dict) else None
    if not (isinstance(summary, dict) and all(isinstance(v, (int, float)) for v in summary.values())):
        log.warning(
            "%s holds no results of `forde train` (no summary of numbers); evaluating the last checkpoint "
            "again to rewrite it",
            path,
        )
        return None
    return results


def read_history(run_dir: Path) -> list[dict]:
    """metrics.jsonl: the epochs a finished run replays to its W&B run. A damaged file costs that replay only."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    try:
        history = [json.loads(line) for line in path.read_text().splitlines()]
    except ValueError as err:
        log.warning("%s is unreadable (%s); its epochs are not replayed to W&B", path, err)
        return []
    if not all(isinstance(h, dict) and isinstance(h.get("epoch"), int) for h in history):
        log.warning("%s holds lines that are not epochs of `forde train`; its epochs are not replayed to W&B", path)
        return []
    return history


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, default=_json_default)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Check that the run directory is free or holds this same run; paths, the device and run options may
    differ (moved data resumes). With run.restart, another config's files move to previous-N/ first.
    Nothing else is written here: config.yaml is written once data and model are built, so a run that
    fails before training leaves nothing in the way of the next command."""
    run_dir = run_dir_of(cfg)
    if not (run_dir / CONFIG).exists() or not any(
        (run_dir / f).exists() for f in (CHECKPOINT, PREVIOUS_CHECKPOINT, RESULTS)
    ):
        return run_dir
    from forde.config import load_config

    saved = load_config(run_dir / CONFIG, trust_code=True)  # only compared: nothing is built from it
    changes = identity_changes(identity(saved), identity(cfg))
    if changes and cfg.run.restart:
        archive = _archive(run_dir)
        log.warning(
            "run.restart: %s held a run with another config (%s); its files moved to %s",
            run_dir,
            "; ".join(changes),
            archive,
        )
    elif changes and all(c.startswith("eval.") for c in changes) and (run_dir / RESULTS).exists():
        raise ConfigError(
            f"run directory {run_dir} holds a finished run, evaluated with other settings ({'; '.join(changes)}). "
            f"To evaluate it again without retraining: forde eval {run_dir} OVERRIDES --out results-NAME.json "
            "(e.g. eval.ood=[svhn]); to retrain, add run.restart=true, or choose another run.name"
        )
    elif changes:
        raise ConfigError(
            f"run directory {run_dir} holds a run with a different config ({'; '.join(changes)}). "
            "To resume it, set those keys back; to start this config over there, add run.restart=true "
            f"(the old files move to {run_dir}/previous-N/); or choose another run.name"
        )
    elif not cfg.run.resume and (run_dir / CHECKPOINT).exists():
        raise ConfigError(
            f"run directory {run_dir} already has a checkpoint and run.resume=false; "
            "set run.resume=true to continue it, or choose another run.name"
        )
    return run_dir


def _archive(run_dir: Path) -> Path:
    taken = [int(p.name.split("-")[1]) for p in run_dir.glob("previous-*") if p.name.split("-")[1].isdigit()]
    archive = run_dir / f"previous-{max(taken, default=0) + 1}"
    archive.mkdir()
    for entry in run_dir.iterdir():
        if entry != archive and not entry.name.startswith("previous-"):
            os.replace(entry, archive / entry.name)
    return archive


def run_record(cfg: TrainConfig, run_dir: Path, epochs: int) -> dict:
    """What a results file says of the run it comes from (written by training and by re-evaluation alike)."""
    return {
        "run_dir": str(run_dir),
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        "seed": cfg.seed,
        "ensemble_size": cfg.ensemble_size,
        "epochs": epochs,
    }
