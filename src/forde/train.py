"""The training loop shared by every method: SGD, the paper's schedule, checkpoints, resume, evaluation.

A run directory is the record of a run:
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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from forde import interrupts, run_lock
from forde.atomic import replace_atomic, unwritable, write_atomic
from forde.config import ConfigError, OptimConfig, TrainConfig, identity, identity_changes, to_dict, to_yaml
from forde.data.base import Dataset
from forde.data.corrupted import CorruptedSet, prepare_corrupted
from forde.data.corrupted import corrupted_sets as configured_corrupted_sets
from forde.data.pipeline import DeviceLoader
from forde.data.registry import input_spec, load_dataset
from forde.device import DeviceSettings, resolve_settings
from forde.ensemble import Ensemble, build_ensemble
from forde.errors import one_line
from forde.evaluate import EvalContext, eval_context, evaluate_corrupted, evaluate_split
from forde.methods import Method, build_method
from forde.models import check_model
from forde.names import RULE, is_path_component
from forde.provenance import run_provenance
from forde.safe_load import UnsafePickleError, torch_load
from forde.step import make_step

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
NAN_CHECK_EVERY = 50  # steps between finiteness checks (each forces a device sync)


class NonFiniteLossError(RuntimeError):
    """Training diverged; the message says where, names the last good checkpoint if there is one, and the fix."""


class RunDirError(RuntimeError):
    """A run directory's files cannot be read back, or written; the message names the file and the fix."""


class Callback(Protocol):
    """Told about each epoch and the final results. A callback may also define `on_history(history)`: the
    epochs trained in earlier sessions, told once when a run resumes (or is found finished)."""

    def on_epoch_end(self, epoch: int, metrics: dict) -> None: ...
    def on_train_end(self, results: dict) -> None: ...


def tell_history(callbacks: Iterable[Callback], history: list[dict]) -> None:
    for cb in callbacks:
        if hasattr(cb, "on_history"):
            cb.on_history(history)


def lr_at(epoch: float, cfg: OptimConfig) -> float:
    """The paper's schedule at a fractional epoch: constant to decay_start, linear to lr * lr_ratio at
    decay_end, constant after; optionally a linear warm-up first."""
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    t = epoch / cfg.epochs
    if t <= cfg.decay_start:
        return cfg.lr
    if t >= cfg.decay_end:
        return cfg.lr * cfg.lr_ratio
    frac = (t - cfg.decay_start) / (cfg.decay_end - cfg.decay_start)
    return cfg.lr * (1.0 - frac * (1.0 - cfg.lr_ratio))


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


@dataclass
class Setup:
    """Everything built from a config before the first step: cheap to rebuild for `forde eval`."""

    cfg: TrainConfig
    settings: DeviceSettings
    dataset: Dataset
    ensemble: Ensemble
    method: Method
    prepare: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)

    @property
    def device(self) -> torch.device:
        return self.settings.device

    def autocast(self, cache_enabled: bool = True):
        return self.settings.autocast(cache_enabled)

    @property
    def eval_ctx(self) -> EvalContext:
        return eval_context(
            self.cfg.eval,
            self.dataset,
            self.device,
            self.cfg.method.grad_target,
            autocast=self.autocast,
            prepare=self.prepare,
        )


def build(cfg: TrainConfig, dataset: Dataset | None = None, method: Method | None = None) -> Setup:
    """`dataset` and `method` replace the configured ones (benchmarks time synthetic data). The model is checked
    against the data's shape before the data is read and the PCA computed."""
    settings = resolve_settings(cfg)
    settings.apply()
    device = settings.device
    if dataset is None:
        check_model(cfg.model, *input_spec(cfg.data), cfg.data.name)
        dataset = load_dataset(cfg.data)
    ensemble = build_ensemble(cfg.model, cfg.ensemble_size, dataset.input_shape, dataset.num_classes, cfg.seed).to(
        device
    )
    ensemble.execution = settings.execution

    def prepare(x):
        return x

    if settings.channels_last and len(dataset.input_shape) == 3:
        ensemble = ensemble.to(memory_format=torch.channels_last)

        def prepare(x):
            return x.contiguous(memory_format=torch.channels_last)

    return Setup(
        cfg, settings, dataset, ensemble, build_method(cfg, dataset, device) if method is None else method, prepare
    )


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, default=_json_default)


class Trainer:
    def __init__(self, setup: Setup, run_dir: Path, callbacks: Iterable[Callback] = ()):
        self.s, self.cfg, self.run_dir = setup, setup.cfg, run_dir
        self.callbacks = list(callbacks)
        o = self.cfg.optim
        if o.batch_size > len(setup.dataset.train):
            raise ConfigError(
                f"optim.batch_size = {o.batch_size} exceeds the {len(setup.dataset.train)} training samples "
                f"of {setup.dataset.name}; lower optim.batch_size"
            )
        self.optimizer = torch.optim.SGD(
            setup.ensemble.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
        self.loader = DeviceLoader(
            setup.dataset.train,
            o.batch_size,
            setup.dataset.mean,
            setup.dataset.std,
            setup.device if self.cfg.data.on_device else "cpu",
            shuffle=True,
            augment=self.cfg.data.augment,
            seed=self.cfg.seed + 1,
            drop_last=True,
        )
        self.step = make_step(setup.method, setup.ensemble, setup.autocast, setup.settings.graphs)
        self.epoch = 0
        self.history: list[dict] = []

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "ensemble": self.s.ensemble.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        self.s.ensemble.load_state_dict(state["ensemble"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.history = state["epoch"], state["history"]

    def save(self) -> None:
        save_checkpoint(self.state_dict(), self.run_dir)
        write_atomic(self.run_dir / METRICS, "".join(json.dumps(h) + "\n" for h in self.history))

    # -- the loop ---------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        s, o = self.s, self.cfg.optim
        s.ensemble.train()
        steps = len(self.loader)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        correct = torch.zeros((), device=s.device)
        seen = 0
        start = time.perf_counter()
        bar = tqdm(
            self.loader,
            total=steps,
            desc=f"epoch {self.epoch + 1}/{o.epochs}",
            leave=False,
            disable=not self.cfg.run.progress,
            dynamic_ncols=True,
        )
        for step, (x, y) in enumerate(bar):
            interrupts.check()
            lr = lr_at(self.epoch + step / steps, o)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            y = y.to(s.device, non_blocking=True)
            loss, logits, stats = self.step(
                s.prepare(x.to(s.device, non_blocking=True)),
                y,
                step=self.epoch * steps + step,
                epoch=self.epoch + step / steps,
            )
            self.optimizer.step()
            for k, v in {"loss": loss, **stats}.items():  # some statistics exist on some steps only
                sums[k] = sums.get(k, 0) + v.float()
                counts[k] = counts.get(k, 0) + 1
            correct += (logits.float().softmax(-1).mean(0).argmax(-1) == y).sum()
            seen += len(y)
            if (step + 1) % NAN_CHECK_EVERY == 0 or step + 1 == steps:
                self._check_finite(sums["loss"], step)
                bar.set_postfix(loss=f"{sums['loss'].item() / (step + 1):.4f}", lr=f"{lr:.4g}")
        elapsed = time.perf_counter() - start
        out = {f"train/{k}": (v / counts[k]).item() for k, v in sums.items()}
        out.update(
            {
                "train/accuracy": correct.item() / seen,
                "train/lr": lr,
                "train/epoch_time_s": elapsed,
                "train/images_per_s": seen / elapsed,
            }
        )
        return out

    def _check_finite(self, loss_sum: torch.Tensor, step: int) -> None:
        if torch.isfinite(loss_sum):
            return
        checkpoint = self.run_dir / CHECKPOINT
        if checkpoint.exists():
            kept = f"{checkpoint} holds epoch {self.epoch}, the last good one"
            again = f"run again with run.restart=true (this attempt's files move to {self.run_dir}/previous-N/)"
        else:
            kept, again = "no epoch finished, so no checkpoint was kept", "run again"
        raise NonFiniteLossError(
            f"training loss became {loss_sum.item()} in epoch {self.epoch + 1} (by step {step + 1}): the run "
            f"diverged at optim.lr={self.cfg.optim.lr:g} ({kept}); lower optim.lr and {again}, or check the data"
        )

    def fit(self) -> None:
        cfg = self.cfg
        while self.epoch < cfg.optim.epochs:
            metrics = {"epoch": self.epoch + 1, **self.train_epoch()}
            if (self.epoch + 1) % cfg.eval.every == 0 or self.epoch + 1 == cfg.optim.epochs:
                split_name = "val" if self.s.dataset.val is not None else "test"
                ev = evaluate_split(self.s.ensemble, self.s.dataset.eval_split, self.s.eval_ctx)
                metrics.update({f"{split_name}/{k}": v for k, v in ev.items()})
            self.epoch += 1
            self.history.append(metrics)
            self.save()  # before callbacks: a pruned or killed trial keeps this epoch
            log.info("epoch %d/%d  %s", self.epoch, cfg.optim.epochs, _brief(metrics))
            for cb in self.callbacks:
                cb.on_epoch_end(self.epoch, metrics)


def _brief(metrics: dict) -> str:
    keys = (
        "train/loss",
        "train/accuracy",
        "val/accuracy",
        "val/nll",
        "test/accuracy",
        "test/nll",
        "train/epoch_time_s",
    )
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


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


def train(cfg: TrainConfig, callbacks: Iterable[Callback] = (), corrupted_sets: CorruptedSets | None = None) -> dict:
    """Train (or resume) the run that `cfg` describes, evaluate it, write results.json, return the results.

    `corrupted_sets` replaces the configured corrupted test sets (None: build missing ones before training). The
    run directory is locked while this runs: another process training it is one line (forde.run_lock)."""
    with run_lock.hold(run_dir_of(cfg)):
        return _train(cfg, list(callbacks), corrupted_sets)


def _train(cfg: TrainConfig, callbacks: list[Callback], corrupted_sets: CorruptedSets | None) -> dict:
    run_dir = prepare_run_dir(cfg)
    finished = read_results(run_dir)
    if finished is not None:
        log.info("%s is complete; reading its results", run_dir)
        tell_history(callbacks, read_history(run_dir))
        for cb in callbacks:
            cb.on_train_end(finished)
        return finished
    torch.manual_seed(cfg.seed)
    setup = build(cfg)
    if corrupted_sets is None:
        prepare_corrupted(cfg, setup.dataset)  # a missing -C set fails (or is built) before any training
        corrupted_sets = default_corrupted_sets
    trainer = Trainer(setup, run_dir, callbacks)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CONFIG, to_yaml(cfg))
    state = load_checkpoint(run_dir)
    if state is not None:
        restore(run_dir, trainer.load_state_dict, state)
        log.info("resuming %s from epoch %d", run_dir, trainer.epoch)
        tell_history(callbacks, trainer.history)
    log.info(
        "%s %s: %s, M=%d, %s on %s (%d train images), %s",
        "training" if trainer.epoch < cfg.optim.epochs else "trained; evaluating",
        run_dir,
        cfg.method.name,
        cfg.ensemble_size,
        cfg.model.name,
        setup.dataset.name,
        len(setup.dataset.train),
        setup.settings.describe(),
    )
    start = time.perf_counter()
    trainer.fit()
    results = {
        **_run_record(cfg, run_dir, trainer.epoch),
        "train_time_s": sum(h["train/epoch_time_s"] for h in trainer.history),
        "session_time_s": time.perf_counter() - start,
    }
    evaluated = time.perf_counter()
    results.update(final_evaluation(setup, corrupted_sets))
    results["eval_time_s"] = time.perf_counter() - evaluated  # the final evaluation: test, validation, corrupted sets
    write_atomic(run_dir / RESULTS, to_json(results))
    log.info("results: %s", _brief_summary(results["summary"]))
    for cb in trainer.callbacks:
        cb.on_train_end(results)
    return results


def _run_record(cfg: TrainConfig, run_dir: Path, epochs: int) -> dict:
    """What a results file says of the run it comes from (written by training and by re-evaluation alike)."""
    return {
        "run_dir": str(run_dir),
        "method": cfg.method.name,
        "dataset": cfg.data.name,
        "seed": cfg.seed,
        "ensemble_size": cfg.ensemble_size,
        "epochs": epochs,
    }


def _brief_summary(summary: dict) -> str:
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


RUN_FILES = (CONFIG, METRICS, CHECKPOINT, PREVIOUS_CHECKPOINT)  # what evaluate_run must never replace


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
    results = {**_run_record(cfg, run_dir, state["epoch"]), **final_evaluation(setup)}
    write_atomic(run_dir / out_name, to_json(results))
    log.info("wrote %s: %s", run_dir / out_name, _brief_summary(results["summary"]))
    return results
