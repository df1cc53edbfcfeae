"""The training loop shared by every method: SGD on the paper's schedule, a checkpoint every epoch, resume, then the
final evaluation. The run directory's files are forde.run_dir's, the evaluation forde.run_evaluation's."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from forde import distributed, interrupts, run_lock
from forde.atomic import write_atomic
from forde.config import ConfigError, OptimConfig, TrainConfig, to_dict, to_yaml
from forde.data.corrupted import prepare_corrupted
from forde.data.ood_sets import check_ood_sets
from forde.data.pipeline import DeviceLoader
from forde.distributed import MemberParallelEnsemble, World
from forde.errors import NonFiniteLossError
from forde.evaluate import evaluate_split
from forde.run_dir import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RESULTS,
    load_checkpoint,
    prepare_run_dir,
    read_history,
    read_results,
    restore,
    run_dir_of,
    run_record,
    save_checkpoint,
    to_json,
)
from forde.run_evaluation import (
    CorruptedSets,
    brief_summary,
    calibrate_needs_validation,
    default_corrupted_sets,
    final_evaluation,
)
from forde.setup import Setup, build
from forde.step import make_step

log = logging.getLogger(__name__)

NAN_CHECK_EVERY = 50  # steps between finiteness checks (each forces a device sync)


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
        params = (  # a method may give some parameters their own settings (node-BNN's variational ones)
            setup.method.param_groups(setup.ensemble, o)
            if hasattr(setup.method, "param_groups")
            else setup.ensemble.parameters()
        )
        self.optimizer = torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
        if isinstance(setup.ensemble, MemberParallelEnsemble):  # how the ranks' optimizers make one process's
            self.layouts = setup.ensemble.layouts(self.optimizer)
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
        self.main = setup.world is None or setup.world.is_main  # the process that writes, logs and reports

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The one-process checkpoint format on every world size (a member-parallel run merges its shares)."""
        ensemble, optimizer = self.s.ensemble.state_dict(), self.optimizer.state_dict()
        if isinstance(self.s.ensemble, MemberParallelEnsemble):
            ensemble, optimizer = self.s.ensemble.full_states(ensemble, optimizer, self.layouts)
        return {
            "epoch": self.epoch,
            "ensemble": ensemble,
            "optimizer": optimizer,
            "loader": self.loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        ensemble, optimizer = state["ensemble"], state["optimizer"]
        if isinstance(self.s.ensemble, MemberParallelEnsemble):
            ensemble, optimizer = self.s.ensemble.local_states(ensemble, optimizer, self.layouts)
        self.s.ensemble.load_state_dict(ensemble)
        self.optimizer.load_state_dict(optimizer)
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.history = state["epoch"], state["history"]

    def save(self) -> None:
        state = self.state_dict()  # every rank: a member-parallel run gathers the members' states
        if self.main:
            save_checkpoint(state, self.run_dir)
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
            disable=not (self.cfg.run.progress and self.main),
            dynamic_ncols=True,
        )
        for step, (x, y) in enumerate(bar):
            interrupts.check()
            lr = lr_at(self.epoch + step / steps, o)
            for group in self.optimizer.param_groups:
                if not group.get("fixed_lr"):
                    group["lr"] = lr
            y = y.to(s.device, non_blocking=True)
            loss, logits, stats = self.step(
                s.prepare(x.to(s.device, non_blocking=True)),
                y,
                step=self.epoch * steps + step,
                epoch=self.epoch + step / steps,
            )
            s.ensemble.reduce_gradients()
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
            if hasattr(self.s.method, "end_epoch"):  # e.g. SWAG collects its moments
                metrics.update(self.s.method.end_epoch(self.s.ensemble, self.epoch + 1, cfg.optim.epochs))
            if (self.epoch + 1) % cfg.eval.every == 0 or self.epoch + 1 == cfg.optim.epochs:
                split_name = "val" if self.s.dataset.val is not None else "test"
                ev = evaluate_split(self.s.ensemble, self.s.dataset.eval_split, self.s.eval_ctx)
                metrics.update({f"{split_name}/{k}": v for k, v in ev.items()})
            self.epoch += 1
            self.history.append(metrics)
            self.save()  # before callbacks: a pruned or killed trial keeps this epoch
            if self.main:
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


def train(cfg: TrainConfig, callbacks: Iterable[Callback] = (), corrupted_sets: CorruptedSets | None = None) -> dict:
    """Train (or resume) the run that `cfg` describes, evaluate it, write results.json, return the results.

    `corrupted_sets` replaces the configured corrupted test sets (None: build missing ones before training). The
    run directory is locked while this runs: another process training it is one line (forde.run_lock). Started by
    torchrun or srun with several processes, they train one ensemble together (forde.distributed): every process
    runs this, rank 0 alone writes the run directory and tells the callbacks."""
    world = distributed.start(cfg.run.distributed, cfg.device, cfg.run.collective_timeout_s)
    if world is None:
        with run_lock.hold(run_dir_of(cfg)):
            return _train(cfg, list(callbacks), corrupted_sets, None)
    try:
        if not world.is_main:
            logging.getLogger("forde").setLevel(logging.WARNING)  # one process speaks
        with run_lock.hold(run_dir_of(cfg)) if world.is_main else contextlib.nullcontext():
            return _train(cfg, list(callbacks) if world.is_main else [], corrupted_sets, world)
    finally:
        distributed.stop()


def _train(
    cfg: TrainConfig, callbacks: list[Callback], corrupted_sets: CorruptedSets | None, world: World | None
) -> dict:
    main = world is None or world.is_main
    run_dir = prepare_run_dir(cfg) if main else run_dir_of(cfg)
    finished = distributed.broadcast(read_results(run_dir) if main else None, world)
    if finished is not None:
        log.info("%s is complete; reading its results", run_dir)
        if main:
            tell_history(callbacks, read_history(run_dir))
        for cb in callbacks:
            cb.on_train_end(finished)
        return finished
    torch.manual_seed(cfg.seed)
    setup = build(cfg, world=world)
    if main:  # files are built and downloaded once, by rank 0, while the others wait
        if corrupted_sets is None:
            prepare_corrupted(cfg, setup.dataset)  # a missing -C set fails (or is built) before any training
        check_ood_sets(cfg, setup.dataset)  # ... and so does a missing or unreadable OOD set
    distributed.barrier(world)
    corrupted_sets = corrupted_sets or default_corrupted_sets
    if cfg.eval.calibrate and setup.dataset.val is None:
        raise ConfigError(calibrate_needs_validation(setup))
    trainer = Trainer(setup, run_dir, callbacks)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / CONFIG, to_yaml(cfg))
    state = distributed.broadcast(load_checkpoint(run_dir) if main else None, world)
    if state is not None:
        restore(run_dir, trainer.load_state_dict, state)
        log.info("resuming %s from epoch %d", run_dir, trainer.epoch)
        tell_history(callbacks, trainer.history)
    log.info(
        "%s %s: %s, M=%d, %s on %s (%d train images), %s%s",
        "training" if trainer.epoch < cfg.optim.epochs else "trained; evaluating",
        run_dir,
        cfg.method.name,
        cfg.ensemble_size,
        cfg.model.name,
        setup.dataset.name,
        len(setup.dataset.train),
        setup.settings.describe(),
        f", {world.size} processes ({world.strategy} parallel)" if world else "",
    )
    start = time.perf_counter()
    trainer.fit()
    results = {
        **run_record(cfg, run_dir, trainer.epoch),
        "train_time_s": sum(h["train/epoch_time_s"] for h in trainer.history),
        "session_time_s": time.perf_counter() - start,
    }
    evaluated = time.perf_counter()
    results.update(final_evaluation(setup, corrupted_sets))  # every rank: the work is split over them
    results["eval_time_s"] = time.perf_counter() - evaluated  # the final evaluation: test, validation, corrupted sets
    if world is not None:
        results["processes"] = {"count": world.size, "strategy": world.strategy}
    if main:
        write_atomic(run_dir / RESULTS, to_json(results))
        log.info("results: %s", brief_summary(results["summary"]))
    for cb in trainer.callbacks:
        cb.on_train_end(results)
    return results
