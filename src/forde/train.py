"""The training loop shared by every method: SGD, the paper's schedule, checkpoints, resume, evaluation.

A run directory is the record of a run:
    config.yaml     the resolved config
    metrics.jsonl   one line per epoch (train and validation metrics)
    checkpoint.pt   the last completed epoch: weights, optimizer, data order, RNG, history
    results.json    the final evaluation (clean test set and every corruption x severity)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from tqdm.auto import tqdm

from forde.config import ConfigError, OptimConfig, TrainConfig, to_dict, to_yaml
from forde.data.base import Dataset, Split
from forde.data.corrupted import corrupted_sets as configured_corrupted_sets, prepare_corrupted
from forde.data.pipeline import DeviceLoader
from forde.data.registry import load_dataset
from forde.device import DeviceSettings, resolve_settings
from forde.ensemble import Ensemble, build_ensemble
from forde.evaluate import EvalContext, evaluate_corrupted, evaluate_split, eval_context
from forde.methods import Method, build_method
from forde.step import make_step

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
NAN_CHECK_EVERY = 50  # steps between finiteness checks (each forces a device sync)


class NonFiniteLossError(RuntimeError):
    """Training diverged; the run directory still holds the last good checkpoint."""


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, metrics: dict) -> None: ...
    def on_train_end(self, results: dict) -> None: ...


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


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's tensors on the CPU: `load_state_dict` moves weights and optimizer state to their device,
    while RNG and generator states must stay CPU ByteTensors."""
    return torch.load(path, map_location="cpu", weights_only=False)


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
        return eval_context(self.cfg.eval, self.dataset, self.device, self.cfg.method.grad_target,
                            autocast=self.autocast, prepare=self.prepare)


def build(cfg: TrainConfig, dataset: Dataset | None = None, method: Method | None = None) -> Setup:
    """`dataset` and `method` replace the configured ones (benchmarks time synthetic data)."""
    settings = resolve_settings(cfg)
    settings.apply()
    device = settings.device
    dataset = load_dataset(cfg.data) if dataset is None else dataset
    ensemble = build_ensemble(cfg.model, cfg.ensemble_size, dataset.input_shape, dataset.num_classes, cfg.seed).to(device)
    ensemble.execution = settings.execution
    prepare = lambda x: x
    if settings.channels_last and len(dataset.input_shape) == 3:
        ensemble = ensemble.to(memory_format=torch.channels_last)
        prepare = lambda x: x.contiguous(memory_format=torch.channels_last)
    return Setup(cfg, settings, dataset, ensemble, build_method(cfg, dataset, device) if method is None else method, prepare)


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
            raise ConfigError(f"optim.batch_size = {o.batch_size} exceeds the {len(setup.dataset.train)} training samples "
                              f"of {setup.dataset.name}; lower optim.batch_size")
        self.optimizer = torch.optim.SGD(setup.ensemble.parameters(), lr=o.lr, momentum=o.momentum,
                                         nesterov=o.nesterov, weight_decay=o.weight_decay)
        self.loader = DeviceLoader(setup.dataset.train, o.batch_size, setup.dataset.mean, setup.dataset.std,
                                   setup.device if self.cfg.data.on_device else "cpu", shuffle=True,
                                   augment=self.cfg.data.augment, seed=self.cfg.seed + 1, drop_last=True)
        self.step = make_step(setup.method, setup.ensemble, setup.autocast, setup.settings.graphs)
        self.epoch = 0
        self.history: list[dict] = []

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "ensemble": self.s.ensemble.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loader": self.loader.state_dict(), "torch_rng": torch.get_rng_state(), "history": self.history,
                "config": to_dict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.s.ensemble.load_state_dict(state["ensemble"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.history = state["epoch"], state["history"]

    def save(self) -> None:
        save_atomic(self.state_dict(), self.run_dir / CHECKPOINT)
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
        bar = tqdm(self.loader, total=steps, desc=f"epoch {self.epoch + 1}/{o.epochs}", leave=False,
                   disable=not self.cfg.run.progress, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            lr = lr_at(self.epoch + step / steps, o)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, logits, stats = self.step(s.prepare(x.to(s.device, non_blocking=True)), y.to(s.device, non_blocking=True),
                                            step=self.epoch * steps + step)
            self.optimizer.step()
            for k, v in {"loss": loss, **stats}.items():  # some statistics exist on some steps only
                sums[k] = sums.get(k, 0) + v.float()
                counts[k] = counts.get(k, 0) + 1
            correct += (logits.float().softmax(-1).mean(0).argmax(-1) == y.to(s.device)).sum()
            seen += len(y)
            if (step + 1) % NAN_CHECK_EVERY == 0 or step + 1 == steps:
                self._check_finite(sums["loss"], step)
                bar.set_postfix(loss=f"{sums['loss'].item() / (step + 1):.4f}", lr=f"{lr:.4g}")
        elapsed = time.perf_counter() - start
        out = {f"train/{k}": (v / counts[k]).item() for k, v in sums.items()}
        out.update({"train/accuracy": correct.item() / seen, "train/lr": lr, "train/epoch_time_s": elapsed,
                    "train/images_per_s": seen / elapsed})
        return out

    def _check_finite(self, loss_sum: torch.Tensor, step: int) -> None:
        if not torch.isfinite(loss_sum):
            last = self.epoch if (self.run_dir / CHECKPOINT).exists() else 0
            raise NonFiniteLossError(
                f"training loss became {loss_sum.item()} in epoch {self.epoch + 1} (by step {step + 1}); "
                f"{self.run_dir / CHECKPOINT} still holds epoch {last}. Lower optim.lr or check the data.")

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
    keys = ("train/loss", "train/accuracy", "val/accuracy", "val/nll", "test/accuracy", "test/nll", "train/epoch_time_s")
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


CorruptedSets = Callable[[Setup], Iterable[tuple[str, int, Split]]]


def default_corrupted_sets(setup: Setup) -> Iterable[tuple[str, int, Split]]:
    """The corrupted sets `eval.corruptions` x `eval.severities` asks for (see forde.data.corrupted)."""
    return configured_corrupted_sets(setup.cfg, setup.dataset)


def final_evaluation(setup: Setup, corrupted_sets: CorruptedSets = default_corrupted_sets) -> dict:
    """Clean test (and validation) metrics and every corruption x severity the config asks for."""
    results: dict[str, Any] = {"test": evaluate_split(setup.ensemble, setup.dataset.test, setup.eval_ctx)}
    if setup.dataset.val is not None:
        results["val"] = evaluate_split(setup.ensemble, setup.dataset.val, setup.eval_ctx)
    sets = list(corrupted_sets(setup))
    if sets:
        bar = lambda it: tqdm(it, total=len(sets), desc="corrupted sets", leave=False, disable=not setup.cfg.run.progress)
        results["corrupted"] = evaluate_corrupted(setup.ensemble, sets, setup.eval_ctx, progress=bar)
    results["summary"] = flat_summary(results)
    return results


def flat_summary(results: dict) -> dict:
    """The headline numbers under flat keys: what sweeps optimise and trackers show."""
    out = {f"{split}/{k}": v for split in ("test", "val") for k, v in results.get(split, {}).items()
           if not isinstance(v, list)}
    for group, vals in results.get("corrupted", {}).get("summary", {}).items():
        prefix = "corrupted" if group == "all" else f"corrupted/{group}"
        out.update({f"{prefix}/{k}": v for k, v in vals.items()})
    return out


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run directory, or check that an existing one holds this same run."""
    run_dir = run_dir_of(cfg)
    if (run_dir / CONFIG).exists():
        from forde.config import load_config
        saved = to_dict(load_config(run_dir / CONFIG))
        current = to_dict(cfg)
        differ = [k for k in current if k != "run" and saved.get(k) != current.get(k)]
        if differ:
            raise ConfigError(f"run directory {run_dir} holds a run with a different config (differs in: "
                              f"{', '.join(differ)}); choose another run.name or remove that directory")
        if not cfg.run.resume and (run_dir / CHECKPOINT).exists():
            raise ConfigError(f"run directory {run_dir} already has a checkpoint and run.resume=false; "
                              "set run.resume=true to continue it, or choose another run.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CONFIG, to_yaml(cfg))
    return run_dir


def train(cfg: TrainConfig, callbacks: Iterable[Callback] = (), corrupted_sets: CorruptedSets | None = None) -> dict:
    """Train (or resume) the run that `cfg` describes, evaluate it, write results.json, return the results.

    `corrupted_sets` replaces the configured corrupted test sets (None: build missing ones before training)."""
    run_dir = prepare_run_dir(cfg)
    if (run_dir / RESULTS).exists():
        log.info("%s is complete; reading its results", run_dir)
        return json.loads((run_dir / RESULTS).read_text())
    torch.manual_seed(cfg.seed)
    setup = build(cfg)
    if corrupted_sets is None:
        prepare_corrupted(cfg, setup.dataset)  # a missing -C set fails (or is built) before any training
        corrupted_sets = default_corrupted_sets
    trainer = Trainer(setup, run_dir, callbacks)
    if (run_dir / CHECKPOINT).exists():
        trainer.load_state_dict(load_checkpoint(run_dir / CHECKPOINT))
        log.info("resuming %s from epoch %d", run_dir, trainer.epoch)
    log.info("training %s: %s, M=%d, %s on %s (%d train images), %s",
             run_dir, cfg.method.name, cfg.ensemble_size, cfg.model.name, setup.dataset.name,
             len(setup.dataset.train), setup.settings.describe())
    start = time.perf_counter()
    trainer.fit()
    results = {"run_dir": str(run_dir), "method": cfg.method.name, "dataset": cfg.data.name, "seed": cfg.seed,
               "ensemble_size": cfg.ensemble_size, "epochs": trainer.epoch,
               "train_time_s": sum(h["train/epoch_time_s"] for h in trainer.history),
               "session_time_s": time.perf_counter() - start,
               **final_evaluation(setup, corrupted_sets)}
    write_atomic(run_dir / RESULTS, to_json(results))
    log.info("results: %s", _brief_summary(results["summary"]))
    for cb in trainer.callbacks:
        cb.on_train_end(results)
    return results


def _brief_summary(summary: dict) -> str:
    keys = ("test/accuracy", "test/nll", "test/ece", "corrupted/accuracy", "corrupted/nll", "corrupted/ece")
    return "  ".join(f"{k} {summary[k]:.4f}" for k in keys if k in summary)


EVAL_OVERRIDABLE = ("eval.", "device", "precision", "channels_last", "cuda.", "model.execution", "run.progress", "data.root")


def evaluate_run(run_dir: Path, overrides: list[str] | None = None, out_name: str = RESULTS) -> dict:
    """Re-evaluate a run directory's checkpoint (e.g. on more corruptions) and write `out_name` there."""
    from forde.config import load_config

    overrides = overrides or []
    bad = [o for o in overrides if not o.startswith(EVAL_OVERRIDABLE)]
    if bad:
        raise ConfigError(f"forde eval accepts only {', '.join(EVAL_OVERRIDABLE)} overrides, got {bad}")
    if not (run_dir / CHECKPOINT).exists():
        raise ConfigError(f"{run_dir / CHECKPOINT} does not exist; is {run_dir} a run directory of `forde train`?")
    cfg = load_config(run_dir / CONFIG, overrides)
    setup = build(cfg)
    state = load_checkpoint(run_dir / CHECKPOINT)
    setup.ensemble.load_state_dict(state["ensemble"])
    prepare_corrupted(cfg, setup.dataset)
    results = {"run_dir": str(run_dir), "method": cfg.method.name, "dataset": cfg.data.name, "seed": cfg.seed,
               "ensemble_size": cfg.ensemble_size, "epochs": state["epoch"],
               **final_evaluation(setup)}
    write_atomic(run_dir / out_name, to_json(results))
    log.info("wrote %s: %s", run_dir / out_name, _brief_summary(results["summary"]))
    return results
