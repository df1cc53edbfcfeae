"""One sweep worker: takes trials from the shared Optuna study until the budget is spent.

The rules (what an attempt can become, what the budget counts, what is retried) are in forde.sweep.lifecycle;
this module carries them out against the storage: it reads the study once per decision under the budget lock
(see forde.sweep.storage), fails the attempts of dead workers, queues retries and grid points, takes a trial,
trains it, and records how it ended, the storage first and the tracker after.

A worker stops after MAX_ENV_FAILURES failures of the environment in a row (the cause is lasting: fix it and
re-run), with exit code EXIT_ENVIRONMENT; a storage that is unavailable for a while (up to OUTAGE_S) is waited
for, not counted.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from forde import interrupts
from forde.config import ConfigError
from forde.interrupts import Interrupted
from forde.sweep.lifecycle import (
    CARRIED,
    DONE,
    DUPLICATE,
    ENVIRONMENT,
    FAILURE,
    GIVEN_UP,
    INTERRUPTED,
    REASON,
    STARTED,
    TRIAL,
    WORKER,
    Decision,
    Failure,
    Ledger,
    classify,
    decide,
    lineage,
)
from forde.sweep.options import EXIT_ENVIRONMENT, parse_args, resolve, run_command
from forde.sweep.storage import GRACE_S, STORAGE_ERRORS, SweepStorage, describe, patiently
from forde.sweep.study import Study
from forde.tracking import WandbRun
from forde.train import NonFiniteLossError, train

log = logging.getLogger(__name__)

MAX_ENV_FAILURES = 3
BACKOFF_S = 2.0
MAX_DRAWS = 10
PRUNED = "pruned"


def open_study(study: Study, storage: SweepStorage) -> optuna.Study:
    """Create or load the Optuna study (concurrent creators race safely), its objectives named by their metrics."""
    for attempt in range(5):
        try:
            opt = optuna.create_study(
                study_name=study.name,
                storage=storage.optuna,
                directions=study.directions,
                sampler=study.make_sampler(),
                pruner=study.make_pruner(),
                load_if_exists=True,
            )
            break
        except optuna.exceptions.DuplicatedStudyError:
            time.sleep(0.2 * (attempt + 1))
    else:
        opt = optuna.load_study(
            study_name=study.name, storage=storage.optuna, sampler=study.make_sampler(), pruner=study.make_pruner()
        )
    if opt.metric_names is None:
        opt.set_metric_names([o.metric for o in study.objectives])
    return opt


def run_name_of(configuration: int) -> str:
    """The run directory's name (under runs/) of a configuration, by its first attempt's number."""
    return f"trial-{configuration:04d}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (a zombie whose parent has not reaped it yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Sweep:
    """One process's hold on the study: the reads, the decisions of forde.sweep.lifecycle, and the writes that
    carry them out."""

    def __init__(self, study: Study, storage: SweepStorage):
        self.study, self.storage = study, storage
        self.opt = open_study(study, storage)
        self.backend = storage.optuna
        self.study_id = self.backend.get_study_id_from_name(study.name)
        self.heartbeats = storage.heartbeats(study.name)
        self.host = socket.gethostname()
        self.tag = f"{self.host}:{os.getpid()}"
        self._ids: dict[int, int] = {}

    def trials(self) -> list[FrozenTrial]:
        return self.opt.get_trials(deepcopy=False)

    def trial_id(self, number: int) -> int:
        if number not in self._ids:
            self._ids[number] = self.backend.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self._ids[number]

    def gone(self, t: FrozenTrial) -> str | None:
        """Why a running attempt's worker is gone; None while it lives. Asked under the budget lock, where a
        worker takes and tags a trial in one go, and while this process runs no trial of its own."""
        tag = t.user_attrs.get(WORKER, "")
        if not tag or tag == self.tag:
            return "its worker stopped while taking it (it died, or lost the storage)"
        host, _, pid = tag.rpartition(":")
        if host == self.host and pid.isdigit() and not pid_alive(int(pid)):
            return f"its worker (pid {pid} on {host}) died during the trial (killed, or out of memory)"
        if time.time() - self.heartbeats.last(t) > GRACE_S:
            return f"its worker (pid {pid} on {host}) sent no heartbeat for {GRACE_S} s (killed, or its machine lost)"
        return None

    def decide(self) -> Decision:
        s = self.study
        return decide(self.trials(), s.n_trials, [s.stored(p) for p in s.grid], s.samples, self.gone)

    def fail(self, number: int, kind: str, reason: str) -> bool:
        """Record why, then FAIL the attempt; False when it had finished meanwhile."""
        trial_id = self.trial_id(number)
        try:
            self.backend.set_trial_user_attr(trial_id, FAILURE, kind)
            self.backend.set_trial_user_attr(trial_id, REASON, reason)
            return self.backend.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False

    def carry_out(self, d: Decision) -> None:
        for f in d.fail:
            if self.fail(f.attempt.number, f.kind, f.reason):
                log.warning("trial %d: %s", f.attempt.number, f.reason)
        failed_now = {f.attempt.number: f for f in d.fail}  # read before they failed: their reasons are here
        for failed in d.requeue:
            self.requeue(failed, failed_now.get(failed.number))
        if d.enqueue is not None:
            self.opt.enqueue_trial(d.enqueue)

    def requeue(self, failed: FrozenTrial, failure: Failure | None = None) -> None:
        """Queue a retry of `failed`: same parameters, run directory and reports, so it resumes from the checkpoint.
        `failure`: how it failed, when this decision failed it (`failed` was read before)."""
        system = {
            "failed_trial": lineage(failed),
            "retry_history": [*failed.system_attrs.get("retry_history", []), failed.number],
        }
        if "fixed_params" in failed.system_attrs:
            system["fixed_params"] = failed.system_attrs["fixed_params"]
        self.opt.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=failed.params,
                distributions=failed.distributions,
                user_attrs={k: v for k, v in failed.user_attrs.items() if k in CARRIED},
                system_attrs=system,
                intermediate_values=failed.intermediate_values,
            )
        )
        number = lineage(failed)
        retry = f"a retry of trial {number}, " if number != failed.number else ""
        kind, reason = (
            (failure.kind, failure.reason)
            if failure is not None
            else (failed.user_attrs.get(FAILURE), failed.user_attrs.get(REASON, "no reason recorded"))
        )
        log.info(
            "trial %d (%srun %s, %s) queued again after: %s", failed.number, retry, run_name_of(number), kind, reason
        )

    def settle(self) -> None:
        """Under the budget lock: fail dead workers' attempts and queue their retries, taking nothing."""
        with self.storage.budget_lock(self.study.name):
            d = self.decide()
            self.carry_out(Decision(fail=d.fail, requeue=d.requeue))

    def take(self) -> tuple[optuna.Trial, dict[str, Any]] | None:
        """Under the budget lock: decide, carry it out, and take what it says (a queued trial, or a new sample
        the study has not tried); None when nothing is left to start."""
        with self.storage.budget_lock(self.study.name):
            d = self.decide()
            self.carry_out(d)
            if d.take is None:
                log.info("worker %d: nothing left to start in study '%s': %s", os.getpid(), self.study.name, d.done)
                return None
            for _ in range(MAX_DRAWS):
                trial = self.opt.ask()
                trial.set_user_attr(WORKER, self.tag)
                params = self.study.suggest(trial)
                assert d.ledger is not None  # decide() always sets it
                twin = None if d.take == "queued" else d.ledger.duplicate_of(trial.params, trial.number)
                if twin is None:
                    return trial, params
                self.fail(
                    trial.number,
                    DUPLICATE,
                    f"the sampler proposed trial {twin}'s configuration again; discarded before it started",
                )
                log.info(
                    "trial %d: the sampler proposed trial %d's configuration again; drawing another", trial.number, twin
                )
        log.warning(
            "the sampler proposed only configurations the study has tried (%d draws in a row): the search "
            "space looks exhausted; stopping",
            MAX_DRAWS,
        )
        return None


class PruningReporter:
    """Reports a per-epoch metric to Optuna and stops the trial when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str | None):
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        if self.metric is None or self.metric not in metrics:
            return
        patiently(self.trial.report, metrics[self.metric], epoch, what="reporting an epoch")
        if patiently(self.trial.should_prune, what="asking the pruner"):
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.metric} = {metrics[self.metric]:.4f})")

    def on_train_end(self, results: dict) -> None:
        pass


@dataclass
class Ending:
    """How an attempt ended: `cause` is DONE, PRUNED, INTERRUPTED, TRIAL or ENVIRONMENT."""

    cause: str
    reason: str | None = None
    values: list[float] | None = None
    summary: dict | None = None
    stop: BaseException | None = None  # a signal's exception, raised on once the attempt is recorded

    @property
    def tracker_outcome(self) -> str:
        return {DONE: "finished", PRUNED: "pruned", INTERRUPTED: "interrupted"}.get(self.cause, "failed")


def _expected(err: BaseException) -> bool:
    """An error trials end with now and then (a bad config, divergence, out of memory, the environment): one line
    in the log; anything else comes with its traceback, to find the bug."""
    return (
        isinstance(err, (ConfigError, MemoryError, NonFiniteLossError, torch.OutOfMemoryError))
        or classify(err) == ENVIRONMENT
    )


class TrialRunner:
    """Turns one attempt into one training run, and records how it ended."""

    def __init__(self, sweep: Sweep, study_dir: Path, *, use_wandb: bool, train_fn: Callable | None = None):
        self.sweep, self.study_dir, self.use_wandb = sweep, study_dir, use_wandb
        self.train_fn = train_fn or train

    def run(self, trial: optuna.Trial, params: dict[str, Any]) -> tuple[str, str | None]:
        """Train and record; returns the cause (DONE, PRUNED, TRIAL or ENVIRONMENT) and the failure's reason.
        A signal's Interrupted (or submitit's SystemExit) is raised on once the attempt is recorded."""
        sweep, study = self.sweep, self.sweep.study
        frozen = sweep.backend.get_trial(sweep.trial_id(trial.number))
        number = lineage(frozen)
        run_name = run_name_of(number)
        run_dir = self.study_dir / "runs" / run_name
        cfg = study.trial_config(params, [f"run.out_dir={run_dir.parent}", f"run.name={run_name}"])
        cfg.run.wandb.group = cfg.run.wandb.group or study.name
        if not self.use_wandb:
            cfg.run.wandb.mode = "disabled"
        patiently(trial.set_user_attr, STARTED, str(run_dir), what="starting a trial")  # the run begins
        if "config_params" not in frozen.user_attrs:  # a retry inherits them
            patiently(trial.set_user_attr, "config_params", params, what="starting a trial")
        log.info("trial %d (%s): %s", trial.number, run_name, params)
        own_paths = [self.study_dir, Path(cfg.data.root)] + ([sweep.storage.path.parent] if sweep.storage.path else [])
        tracker = None
        with sweep.heartbeats.running(trial.number, sweep.trial_id(trial.number)):
            try:
                tracker = WandbRun(
                    cfg,
                    run_dir,
                    run_id=f"{study.name}-{run_name}",
                    name=run_name,
                    extra_config={"trial": number, "study": study.name, "params": params},
                )
                results = self.train_fn(cfg, callbacks=[tracker, PruningReporter(trial, study.prune_metric)])
                ending = Ending(
                    DONE, values=[results["summary"][o.metric] for o in study.objectives], summary=results["summary"]
                )
            except optuna.TrialPruned as err:
                ending = Ending(PRUNED, reason=str(err))
            except (Interrupted, SystemExit) as err:  # SystemExit: submitit requeueing a preempted Slurm job
                cause = (
                    f"by {err}" if isinstance(err, Interrupted) else "by an exit request (a time limit or preemption)"
                )
                ending = Ending(
                    INTERRUPTED,
                    f"interrupted {cause}; resumes from its last checkpoint when the sweep is re-run",
                    stop=err,
                )
            except Exception as err:
                cause = classify(err, own_paths)
                ending = Ending(cause, describe(err))
                log.error(
                    "trial %d failed (%s): %s",
                    trial.number,
                    "the environment" if cause == ENVIRONMENT else "the trial itself",
                    ending.reason,
                    exc_info=not _expected(err),
                )
        try:
            patiently(self.record, trial, ending, what="recording a trial")  # the storage first ...
        finally:
            if tracker is not None:  # ... then the tracker: a slow W&B never leaves the attempt running
                tracker.finish(ending.tracker_outcome, ending.reason)
            sweep.heartbeats.forget(trial.number)
        if ending.stop is not None:
            raise ending.stop
        return ending.cause, ending.reason

    def record(self, trial: optuna.Trial, ending: Ending) -> None:
        sweep, opt = self.sweep, self.sweep.opt
        if ending.cause in (DONE, PRUNED):
            try:
                if ending.summary is not None:
                    trial.set_user_attr("summary", ending.summary)
                told = opt.tell(
                    trial,
                    ending.values,
                    state=TrialState.PRUNED if ending.cause == PRUNED else None,
                    skip_if_finished=True,
                )
            except UpdateFinishedTrialError:  # failed by another worker between the two writes, or during tell
                told = sweep.backend.get_trial(sweep.trial_id(trial.number))
            if told.state == TrialState.FAIL:
                log.warning(
                    "trial %d finished after another worker declared it dead; its retry reads the results "
                    "from the run directory",
                    trial.number,
                )
            return
        kind, reason = ending.cause, ending.reason or ending.cause
        if kind in (TRIAL, ENVIRONMENT):
            config = Ledger(sweep.trials()).of(sweep.backend.get_trial(sweep.trial_id(trial.number)))
            kind = config.failure_kind(kind)
            if kind == GIVEN_UP:
                reason = config.given_up_reason(reason)
                log.error("trial %d: %s", trial.number, reason)
            elif kind == ENVIRONMENT:
                reason += " (a failure of the environment: retried from its checkpoint, not counted again)"
        sweep.fail(trial.number, kind, reason)


def run_worker(
    study: Study, storage: SweepStorage, study_dir: Path, *, use_wandb: bool = True, train_fn: Callable | None = None
) -> int:
    """Take trials until none is left; returns the process exit code (EXIT_ENVIRONMENT when a lasting
    problem of the environment stopped it). `train_fn` replaces forde.train.train (benchmarks, tests)."""
    sweep = patiently(Sweep, study, storage, what="opening the study")
    runner = TrialRunner(sweep, study_dir, use_wandb=use_wandb, train_fn=train_fn)
    in_a_row = 0
    while True:
        interrupts.check()
        try:
            picked = patiently(sweep.take, what="taking a trial")
            if picked is None:
                break
            cause, reason = runner.run(*picked)
        except STORAGE_ERRORS as err:
            cause, reason = ENVIRONMENT, f"storage {storage.display}: {describe(err)}"
            log.error("worker %d: %s", os.getpid(), reason)
        if cause != ENVIRONMENT:
            in_a_row = 0
            continue
        in_a_row += 1
        if in_a_row >= MAX_ENV_FAILURES:
            log.error(
                "worker %d: stopping after %d failures of the environment in a row; the last: %s. Fix the cause "
                "and re-run the same command: these trials resume from their checkpoints",
                os.getpid(),
                in_a_row,
                reason,
            )
            return EXIT_ENVIRONMENT
        interrupts.sleep(BACKOFF_S * in_a_row)
    log.info("worker %d: no trials left in study '%s'", os.getpid(), study.name)
    return 0


def serve(args) -> int:
    """A worker process (`launch.py --worker ...`: started by a launcher, or a Slurm array task): the storage is
    waited for, not checked at once, since its launcher has checked it."""
    study, study_dir, storage = resolve(args)
    storage.check(patient=True)
    if args.parent_pid:
        interrupts.stop_when_orphaned(args.parent_pid)
    with interrupts.between_steps(worker=True):
        return run_worker(study, storage, study_dir, use_wandb=not args.no_wandb)


def main(argv: list[str]) -> int:
    """A worker process from its command line (the launcher's arguments with --worker and the study file's path)."""
    return run_command(parse_args(argv, Path.cwd()), serve)
