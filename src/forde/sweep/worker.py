"""One sweep worker: takes trials from the shared Optuna study until the budget is spent.

Nothing is lost when a worker dies:
- each trial trains in its own run directory, named after the trial it first was, so a retry resumes
  from the last checkpoint;
- a heartbeat marks a dead worker's trial as failed after `grace_period` seconds and Optuna re-queues
  it (up to `max_retry` times); a worker starting on the same host re-queues at once the trials of
  processes that no longer exist;
- the budget is reserved under a lock (a file lock for SQLite, an advisory lock for PostgreSQL), so
  many workers never start more than `n_trials` trials between them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from forde.config import ConfigError
from forde.sweep.study import Study
from forde.tracking import WandbRun
from forde.train import train

log = logging.getLogger(__name__)

HEARTBEAT_S = 20
GRACE_S = 60
MAX_RETRY = 3


def storage_for(url: str) -> RDBStorage:
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                      heartbeat_stale_trial_callback=retry_callback())


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)


def open_study(study: Study, storage: RDBStorage) -> optuna.Study:
    """Create or load the Optuna study; concurrent creators race safely."""
    for attempt in range(5):
        try:
            return optuna.create_study(study_name=study.name, storage=storage, directions=study.directions,
                                       sampler=study.make_sampler(), pruner=study.make_pruner(), load_if_exists=True)
        except optuna.exceptions.DuplicatedStudyError:
            time.sleep(0.2 * (attempt + 1))
    return optuna.load_study(study_name=study.name, storage=storage, sampler=study.make_sampler(),
                             pruner=study.make_pruner())


@contextlib.contextmanager
def budget_lock(url: str, study_name: str, lock_dir: Path):
    """Serialise 'count trials, reserve one' across workers sharing the storage."""
    if url.startswith("postgresql"):
        from sqlalchemy import create_engine, text

        key = int(hashlib.sha1(study_name.encode()).hexdigest()[:15], 16)
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
    else:
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f".{study_name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def original_number(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the trial this one retries (itself when it is no retry)."""
    retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if retried is None else retried


def logical_trials(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that use a budget slot: every trial except automatic retries."""
    return [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is None]


def next_trial(opt: optuna.Study, study: Study) -> optuna.Trial | None:
    """Call under the budget lock: a queued trial (grid point or retry), a new one while the budget
    lasts, or None when the study is done."""
    trials = opt.get_trials(deepcopy=False)
    if not any(t.state == TrialState.WAITING for t in trials) and len(logical_trials(trials)) >= study.n_trials:
        return None
    return opt.ask()


def enqueue_grid(opt: optuna.Study, study: Study) -> None:
    """Queue every grid point not already in the study (idempotent across re-runs and workers)."""
    present = [t.params or t.system_attrs.get("fixed_params", {}) for t in logical_trials(opt.get_trials(deepcopy=False))]
    for point in study.grid:
        if not any(all(p.get(k) == v for k, v in point.items()) for p in present):
            opt.enqueue_trial(point)
            present.append(point)


def requeue_dead_local_trials(opt: optuna.Study, storage: RDBStorage) -> None:
    """Fail (and so re-queue) RUNNING trials whose worker process on this host is gone."""
    host = socket.gethostname()
    retry = retry_callback()
    for t in opt.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        w_host, _, pid = worker.rpartition(":")
        if w_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            log.warning("trial %d's worker %s is gone; re-queueing it", t.number, worker)
            if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                retry(opt, storage.get_trial(t._trial_id))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def heartbeat(storage: RDBStorage, trial_id: int):
    """Record the trial's heartbeat every HEARTBEAT_S seconds while it runs."""
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            storage.record_heartbeat(trial_id)
            stop.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class PruningReporter:
    """Reports a per-epoch metric to Optuna and stops the trial when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str | None):
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        if self.metric is None or self.metric not in metrics:
            return
        self.trial.report(metrics[self.metric], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.metric} = {metrics[self.metric]:.4f})")

    def on_train_end(self, results: dict) -> None:
        pass


class TrialRunner:
    """Turns one Optuna trial into one training run and its outcome."""

    def __init__(self, study: Study, study_dir: Path, storage: RDBStorage, *, use_wandb: bool):
        self.study, self.study_dir, self.storage, self.use_wandb = study, study_dir, storage, use_wandb

    def __call__(self, trial: optuna.Trial) -> list[float] | float:
        study = self.study
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        params = study.suggest(trial)
        number = original_number(self.storage.get_trial(trial._trial_id))
        run_name = f"trial-{number:04d}"
        run_dir = self.study_dir / "runs" / run_name
        try:
            cfg = study.trial_config(params, [f"run.out_dir={run_dir.parent}", f"run.name={run_name}"])
        except ConfigError as err:
            trial.set_user_attr("fail_reason", f"config error: {err}")
            raise
        cfg.run.wandb.group = cfg.run.wandb.group or study.name
        if not self.use_wandb:
            cfg.run.wandb.mode = "disabled"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("config_params", params)
        log.info("trial %d (%s): %s", trial.number, run_name, params)
        tracker = WandbRun(cfg, run_dir, run_id=f"{study.name}-{run_name}", name=run_name,
                           extra_config={"trial": number, "study": study.name, "params": params})
        exit_code = 1
        try:
            results = train(cfg, callbacks=[tracker, PruningReporter(trial, study.prune_metric)])
            exit_code = 0
        except optuna.TrialPruned:
            exit_code = 0
            raise
        finally:
            tracker.finish(exit_code=exit_code)
        trial.set_user_attr("summary", results["summary"])
        values = [results["summary"][o.metric] for o in study.objectives]
        return values if study.multi_objective else values[0]

    def run(self, opt: optuna.Study, trial: optuna.Trial) -> None:
        """Run and tell. A Ctrl-C or kill leaves the trial RUNNING: the next worker re-queues it."""
        with heartbeat(self.storage, trial._trial_id):
            try:
                values = self(trial)
            except optuna.TrialPruned as err:
                log.info("trial %d pruned: %s", trial.number, err)
                opt.tell(trial, state=TrialState.PRUNED)
                return
            except Exception as err:  # recorded once, with the reason, and the worker moves on
                trial.set_user_attr("fail_reason", trial.user_attrs.get("fail_reason") or f"{type(err).__name__}: {err}")
                log.error("trial %d failed: %s\n%s", trial.number, err, traceback.format_exc())
                opt.tell(trial, state=TrialState.FAIL)
                return
        opt.tell(trial, values)


def run_worker(study: Study, storage_url: str, study_dir: Path, *, use_wandb: bool = True) -> None:
    storage = storage_for(storage_url)
    opt = open_study(study, storage)
    requeue_dead_local_trials(opt, storage)
    runner = TrialRunner(study, study_dir, storage, use_wandb=use_wandb)
    while True:
        optuna.storages.fail_stale_trials(opt)
        with budget_lock(storage_url, study.name, study_dir):
            if study.grid:
                enqueue_grid(opt, study)
            trial = next_trial(opt, study)
        if trial is None:
            break
        runner.run(opt, trial)
    log.info("worker %d: no trials left in study '%s'", os.getpid(), study.name)
