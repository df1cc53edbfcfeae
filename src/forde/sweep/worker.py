"""One sweep worker: takes trials from the shared Optuna study until the budget is spent.

The rules (what an attempt can become, what the budget counts, what is retried, when a worker is taken for dead)
are in forde.sweep.lifecycle; this module carries them out against the storage: it reads the study once per
decision under the budget lock (forde.sweep.locks), checks that it still holds the lock before it writes what it
decided, fails the attempts of dead workers, queues retries and grid points, takes a trial, trains it in its run
directory (locked: forde.run_lock), and records how it ended, the storage first and the tracker after.

A worker stops after MAX_ENV_FAILURES failures of the environment in a row (the cause is lasting: fix it and
re-run), and at once when its accelerator fails (the error sticks to the process), with exit code
EXIT_ENVIRONMENT; a storage that is unavailable for a while (up to OUTAGE_S) is waited for, not counted.
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
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from forde import interrupts, run_lock
from forde.interrupts import Interrupted, Superseded
from forde.sweep.folder import refuse_link
from forde.sweep.lifecycle import (
    BACKOFF_S,
    CARRIED,
    DONE,
    DUPLICATE,
    ENVIRONMENT,
    FAILURE,
    GIVEN_UP,
    INTERRUPTED,
    MAX_DRAWS,
    MAX_ENV_FAILURES,
    NOT_STARTED,
    REASON,
    STARTED,
    STORAGE_ERRORS,
    TRIAL,
    WORKER,
    WORKER_START,
    Decision,
    Failure,
    Ledger,
    Observer,
    classify,
    decide,
    describe,
    expected,
    gone,
    is_accelerator_error,
    lineage,
)
from forde.sweep.locks import Held, LockLost
from forde.sweep.options import EXIT_ENVIRONMENT, parse_args, resolve, run_command
from forde.sweep.outages import patiently, storage_up_since
from forde.sweep.records import retry_of
from forde.sweep.storage import SweepStorage
from forde.sweep.study import Study
from forde.sweep.trial_processes import processes_per_trial, trial_processes
from forde.tracking import WandbRun

log = logging.getLogger(__name__)

PRUNED, SUPERSEDED = "pruned", "superseded"


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


def process_start(pid: int) -> int | None:
    """When a process of this host started (clock ticks since boot), or None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, started: float | None = None) -> bool:
    """Whether a process of this host still runs (a zombie whose parent has not reaped it yet does not), and is the
    one that started at `started` (a pid is reused once its process is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        return True
    now_started = process_start(pid)
    return started is None or now_started is None or now_started == started


class Sweep:
    """One process's hold on the study: the reads, the decisions of forde.sweep.lifecycle, and the writes that
    carry them out."""

    def __init__(self, study: Study, storage: SweepStorage):
        self.study, self.storage = study, storage
        self.opt = open_study(study, storage)
        self.records = storage.records(study.name)
        self.heartbeats = storage.heartbeats(self.records, study.name)
        self.host = socket.gethostname()
        self.tag = f"{self.host}:{os.getpid()}"
        self.started = process_start(os.getpid())

    def trials(self) -> list[FrozenTrial]:
        return self.opt.get_trials(deepcopy=False)

    def observer(self) -> Observer:
        return Observer(self.tag, self.host, process_alive, storage_up_since())

    def decide(self, stopped: dict[str, str] | None = None) -> Decision:
        s, me, now = self.study, self.observer(), time.time()
        return decide(
            self.trials(),
            s.n_trials,
            [s.stored(p) for p in s.grid],
            s.samples,
            lambda t: gone(t, self.heartbeats.last(t), now, me),
            stopped,
        )

    def fail(self, number: int, kind: str, reason: str) -> bool:
        """Record why, then FAIL the attempt; False when it had finished meanwhile."""
        return self.records.fail(number, {FAILURE: kind, REASON: reason})

    def carry_out(self, d: Decision, held: Held) -> None:
        """What `d` says, once `held` shows the lock it was decided under is still this process's."""
        held.check()
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
        self.opt.add_trial(retry_of(failed, {k: v for k, v in failed.user_attrs.items() if k in CARRIED}))
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

    def settle(self, stopped: dict[str, str] | None = None) -> None:
        """Under the budget lock: fail dead workers' attempts (`stopped`: workers the launcher killed on request,
        and how: their attempts are interrupted) and queue their retries, taking nothing."""
        while True:
            try:
                with self.storage.budget_lock(self.study.name) as held:
                    d = self.decide(stopped)
                    self.carry_out(Decision(fail=d.fail, requeue=d.requeue), held)
                return
            except LockLost as err:
                log.warning("lost the budget lock while deciding (%s); deciding again", err)

    def take(self) -> tuple[optuna.Trial, dict[str, Any]] | None:
        """Under the budget lock: decide, carry it out, and take what it says (a queued trial, or a new sample
        the study has not tried); None when nothing is left to start. A decision whose lock was lost meanwhile is
        undone as far as it went, and made again."""
        while True:
            interrupts.check()
            try:
                with self.storage.budget_lock(self.study.name) as held:
                    return self._take(held)
            except (LockLost, UpdateFinishedTrialError) as err:
                why = err if isinstance(err, LockLost) else "a trial it took was failed by another worker meanwhile"
                log.warning("worker %d lost the budget lock while deciding (%s); deciding again", os.getpid(), why)

    def _take(self, held: Held) -> tuple[optuna.Trial, dict[str, Any]] | None:
        d = self.decide()
        self.carry_out(d, held)
        if d.take is None:
            log.info("worker %d: nothing left to start in study '%s': %s", os.getpid(), self.study.name, d.done)
            return None
        assert d.ledger is not None  # decide() always sets it
        for _ in range(MAX_DRAWS):
            trial = self.opt.ask()
            trial.set_user_attr(WORKER, self.tag)
            if self.started is not None:
                trial.set_user_attr(WORKER_START, self.started)
            try:
                held.check()  # the trial was taken under the lock: else another worker may have counted it
            except LockLost:
                self.fail(trial.number, NOT_STARTED, "taken under a budget lock this worker had lost; discarded")
                raise
            params = self.study.suggest(trial)
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
    """How an attempt ended: `cause` is DONE, PRUNED, INTERRUPTED, SUPERSEDED, TRIAL or ENVIRONMENT."""

    cause: str
    reason: str | None = None
    values: list[float] | None = None
    summary: dict | None = None
    stop: BaseException | None = None  # a signal's exception, raised on once the attempt is recorded
    device_failed: bool = False  # the accelerator failed: this worker cannot train anything else

    @property
    def tracker_outcome(self) -> str:
        return {DONE: "finished", PRUNED: "pruned", INTERRUPTED: "interrupted"}.get(self.cause, "failed")


class TrialRunner:
    """Turns one attempt into one training run, and records how it ended."""

    def __init__(self, sweep: Sweep, study_dir: Path, *, use_wandb: bool, train_fn: Callable | None = None):
        self.sweep, self.study_dir, self.use_wandb = sweep, study_dir, use_wandb
        if train_fn is None:  # torch, imported where a trial trains: a launcher that only starts workers never does
            from forde.train import train

            train_fn = train
        self.train_fn: Callable = train_fn

    def run(self, trial: optuna.Trial, params: dict[str, Any]) -> Ending:
        """Train and record. Whatever the attempt raises ends here, in one Ending written to the storage: a signal's
        Interrupted (or submitit's SystemExit) is raised on once the attempt is recorded."""
        sweep, study = self.sweep, self.sweep.study
        own_paths = [self.study_dir] + ([sweep.storage.path.parent] if sweep.storage.path else [])
        tracker = None
        try:
            with sweep.heartbeats.running(trial.number, lambda why: interrupts.stop_run(Superseded(why))):
                frozen = patiently(sweep.records.get, trial.number, what="starting a trial")
                number = lineage(frozen)
                run_name = run_name_of(number)
                run_dir = self.study_dir / "runs" / run_name
                refuse_link(run_dir)  # planted while the sweep ran: it would take the trial's files elsewhere
                cfg = study.trial_config(params, [f"run.out_dir={run_dir.parent}", f"run.name={run_name}"])
                own_paths.append(Path(cfg.data.root))
                cfg.run.wandb.group = cfg.run.wandb.group or study.name
                if not self.use_wandb:
                    cfg.run.wandb.mode = "disabled"
                with run_lock.hold(run_dir, waiting=self._waiting(trial.number, run_name)):
                    started: dict[str, Any] = {STARTED: str(run_dir)}  # the run begins
                    if "config_params" not in frozen.user_attrs:  # a retry inherits them
                        started["config_params"] = params
                    if not patiently(sweep.records.set_user_attrs, trial.number, started, what="starting a trial"):
                        raise Superseded("failed by another worker before its run began")
                    log.info("trial %d (%s): %s", trial.number, run_name, params)
                    tracker = WandbRun(
                        cfg,
                        run_dir,
                        run_id=f"{study.name}-{run_name}",
                        name=run_name,
                        extra_config={"trial": number, "study": study.name, "params": params},
                    )
                    with trial_processes(cfg, run_dir, processes_per_trial()):  # several devices: helper ranks
                        results = self.train_fn(cfg, callbacks=[tracker, PruningReporter(trial, study.prune_metric)])
            ending = Ending(
                DONE, values=[results["summary"][o.metric] for o in study.objectives], summary=results["summary"]
            )
        except BaseException as err:  # noqa: B036 (every way out of an attempt is recorded, then raised on if a stop)
            ending = self.ending_of(trial.number, err, own_paths)
        finally:
            interrupts.run_stopped()
        try:
            patiently(self.record, trial, ending, what="recording a trial")  # the storage first ...
        finally:
            if tracker is not None:  # ... then the tracker: a slow W&B never leaves the attempt running
                tracker.finish(ending.tracker_outcome, ending.reason)
            sweep.heartbeats.forget(trial.number)
        if ending.stop is not None:
            raise ending.stop
        return ending

    def _waiting(self, number: int, run_name: str) -> Callable[[str], None]:
        """While another process still trains the run directory: say so once a minute, and stop on a signal."""
        said = [0.0]

        def waiting(holder: str) -> None:
            if time.monotonic() - said[0] >= 60:
                said[0] = time.monotonic()
                log.warning(
                    "trial %d: run %s is still trained by %s (taken for dead, it has not noticed yet); waiting for it "
                    "to stop",
                    number,
                    run_name,
                    holder,
                )
            interrupts.check()

        return waiting

    def ending_of(self, number: int, err: BaseException, own_paths: list[Path]) -> Ending:
        """What an exception that ended an attempt makes of it."""
        if isinstance(err, optuna.TrialPruned):
            return Ending(PRUNED, reason=str(err))
        if isinstance(err, (Superseded, UpdateFinishedTrialError)):
            why = str(err) if isinstance(err, Superseded) else "failed by another worker while it started"
            log.warning(
                "trial %d was taken over while it ran (%s): stopped here; its retry resumes from the checkpoint",
                number,
                why,
            )
            return Ending(SUPERSEDED, why)
        if isinstance(err, Interrupted) or (isinstance(err, SystemExit) and interrupts.raised_by_signal(err)):
            cause = f"by {err}" if isinstance(err, Interrupted) else "by an exit request (a time limit or preemption)"
            return Ending(
                INTERRUPTED, f"interrupted {cause}; resumes from its last checkpoint when the sweep is re-run", stop=err
            )
        if isinstance(err, SystemExit):  # the trial's own code called sys.exit
            reason = f"SystemExit: the trial's code called sys.exit({err.code!r})"
            log.error("trial %d failed (the trial itself): %s", number, reason)
            return Ending(TRIAL, reason)
        if not isinstance(err, Exception):  # KeyboardInterrupt and the like: a stop, recorded, then raised on
            return Ending(
                INTERRUPTED, f"interrupted by {type(err).__name__}; resumes from its last checkpoint", stop=err
            )
        cause = classify(err, own_paths)
        device = is_accelerator_error(err)
        reason = describe(err) + (" (the accelerator failed: its worker stops)" if device else "")
        log.error(
            "trial %d failed (%s): %s",
            number,
            "the environment" if cause == ENVIRONMENT else "the trial itself",
            reason,
            exc_info=not expected(err),
        )
        return Ending(cause, reason, device_failed=device)

    def record(self, trial: optuna.Trial, ending: Ending) -> None:
        sweep, opt = self.sweep, self.sweep.opt
        if ending.cause == SUPERSEDED:  # another worker failed it already and queued its retry
            return
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
                told = sweep.records.get(trial.number)
            if told.state == TrialState.FAIL:
                log.warning(
                    "trial %d finished after another worker declared it dead; its retry reads the results "
                    "from the run directory",
                    trial.number,
                )
            return
        kind, reason = ending.cause, ending.reason or ending.cause
        if kind in (TRIAL, ENVIRONMENT):
            config = Ledger(sweep.trials()).of(sweep.records.get(trial.number))
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
    problem of the environment, or a failed accelerator, stopped it). `train_fn` replaces forde.train.train
    (benchmarks, tests)."""
    sweep = patiently(Sweep, study, storage, what="opening the study")
    runner = TrialRunner(sweep, study_dir, use_wandb=use_wandb, train_fn=train_fn)
    in_a_row = 0
    while True:
        interrupts.check()
        try:
            picked = patiently(sweep.take, what="taking a trial")
            if picked is None:
                break
            ending = runner.run(*picked)
            cause, reason = ending.cause, ending.reason
        except STORAGE_ERRORS as err:
            ending, cause, reason = None, ENVIRONMENT, f"storage {storage.display}: {describe(err)}"
            log.error("worker %d: %s", os.getpid(), reason)
        if ending is not None and ending.device_failed:
            log.error(
                "worker %d: stopping, its accelerator failed (%s); its trial is retried from its checkpoint by another "
                "worker. Check the GPU (nvidia-smi) and re-run the same command",
                os.getpid(),
                reason,
            )
            return EXIT_ENVIRONMENT
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
