"""One sweep worker: takes trials from the shared Optuna study until the budget is spent.

How a trial ends, and what it costs (user attributes `failure` and `fail_reason` say which and why):
- complete or pruned: counts toward n_trials.
- failed because of the trial itself (a config error, divergence, out of device memory): counts, once.
- failed because of the environment (W&B, disk, permissions, storage, missing data, any other error), its
  worker killed, or interrupted (SIGTERM, Ctrl-C): does not count. A retry is queued that resumes from the
  trial's last checkpoint in the same run directory. A worker stops after MAX_ENV_FAILURES environment
  failures in a row (the cause is lasting: fix it and re-run); a configuration whose worker is killed more
  than MAX_KILLS times is given up, and then counts (it likely exhausts the machine's memory).
- a configuration the sampler proposes again is discarded before it starts (`duplicate`) and redrawn; a
  trial whose worker died while taking it is discarded too (`not_started`) and drawn or queued again.

Everything that touches other workers' trials (failing dead ones, queueing retries) and taking a trial
happens under the budget lock (see forde.sweep.storage), so workers never race for a trial and never
start more than n_trials between them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import defaultdict
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from forde import interrupts
from forde.config import ConfigError, MissingDataError
from forde.sweep.sampling import duplicate_of
from forde.sweep.storage import GRACE_S, STORAGE_ERRORS, SweepStorage
from forde.sweep.study import Study
from forde.tracking import WandbRun
from forde.train import NonFiniteLossError, train

log = logging.getLogger(__name__)

MAX_KILLS = 3
MAX_ENV_FAILURES = 3
BACKOFF_S = 2.0
MAX_DRAWS = 10
EXIT_ENVIRONMENT = 3

FAILURE = "failure"
TRIAL, ENVIRONMENT, KILLED, INTERRUPTED, DUPLICATE, NOT_STARTED, GIVEN_UP = (
    "trial", "environment", "killed", "interrupted", "duplicate", "not_started", "given_up")
RETRIED = (ENVIRONMENT, KILLED, INTERRUPTED)
DISCARDED = (DUPLICATE, NOT_STARTED)  # attempts that are no part of any configuration's history
CARRIED_ATTRS = ("run_dir", "config_params")  # what a retry inherits from the attempt it retries


class Interrupted(BaseException):
    """SIGTERM or SIGINT: stop the trial (it resumes when the sweep is re-run) and the worker."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def failure_kind(err: BaseException) -> str:
    """TRIAL for what this configuration caused (fails once, counts), ENVIRONMENT for the rest (retried)."""
    import torch

    if isinstance(err, MissingDataError):
        return ENVIRONMENT
    if isinstance(err, (ConfigError, NonFiniteLossError, torch.OutOfMemoryError, MemoryError)):
        return TRIAL
    return ENVIRONMENT


def describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def open_study(study: Study, storage: SweepStorage) -> optuna.Study:
    """Create or load the Optuna study (concurrent creators race safely), its objectives named by their metrics."""
    for attempt in range(5):
        try:
            opt = optuna.create_study(study_name=study.name, storage=storage.optuna, directions=study.directions,
                                      sampler=study.make_sampler(), pruner=study.make_pruner(), load_if_exists=True)
            break
        except optuna.exceptions.DuplicatedStudyError:
            time.sleep(0.2 * (attempt + 1))
    else:
        opt = optuna.load_study(study_name=study.name, storage=storage.optuna, sampler=study.make_sampler(),
                                pruner=study.make_pruner())
    if opt.metric_names is None:
        opt.set_metric_names([o.metric for o in study.objectives])
    return opt


# -- lineages: a trial and its retries ---------------------------------------------------------------
def lineage(trial: FrozenTrial) -> int:
    """The number of the trial this one retries (itself when it is no retry)."""
    return trial.system_attrs.get("failed_trial", trial.number)


def lineages(trials: list[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    """Attempts grouped by the trial they retry; discarded attempts (duplicate, not_started) belong to none."""
    out: dict[int, list[FrozenTrial]] = defaultdict(list)
    for t in trials:
        if t.user_attrs.get(FAILURE) not in DISCARDED:
            out[lineage(t)].append(t)
    return out


def counts(attempts: list[FrozenTrial]) -> bool:
    """Whether a lineage uses a slot of the budget: finished, running or queued, or failed by its own doing."""
    return any(a.state != TrialState.FAIL or a.user_attrs.get(FAILURE, TRIAL) not in RETRIED for a in attempts)


def budget_used(trials: list[FrozenTrial]) -> int:
    return sum(counts(attempts) for attempts in lineages(trials).values())


def requeue(opt: optuna.Study, failed: FrozenTrial) -> None:
    """Queue a retry of `failed`: same parameters, run directory and reports, so it resumes from the checkpoint."""
    system = {"failed_trial": lineage(failed), "retry_history": [*failed.system_attrs.get("retry_history", []), failed.number]}
    if "fixed_params" in failed.system_attrs:
        system["fixed_params"] = failed.system_attrs["fixed_params"]
    opt.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=failed.params, distributions=failed.distributions,
        user_attrs={k: v for k, v in failed.user_attrs.items() if k in CARRIED_ATTRS}, system_attrs=system,
        intermediate_values=failed.intermediate_values))
    retry = f" (a retry of trial {lineage(failed)})" if lineage(failed) != failed.number else ""
    log.info("trial %d%s (%s) queued again after: %s", failed.number, retry, failed.user_attrs.get(FAILURE),
             failed.user_attrs.get("fail_reason", "?"))


def mark_failed(opt: optuna.Study, trial_id: int, kind: str, reason: str) -> bool:
    """Record why, then FAIL the trial; False when it had finished meanwhile."""
    try:
        opt._storage.set_trial_user_attr(trial_id, FAILURE, kind)
        opt._storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        return opt._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False


def _pid_alive(pid: int) -> bool:
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


def reconcile(opt: optuna.Study, storage: SweepStorage) -> None:
    """Under the budget lock: fail the running trials of dead workers (gone from this host, or silent for
    GRACE_S seconds, or gone before they tagged the trial they took), then queue one retry for every lineage
    whose last attempt failed for a reason outside itself."""
    host = socket.gethostname()
    stale = set(storage.stale_trial_ids(opt))
    trials = opt.get_trials(deepcopy=False)
    by_lineage = lineages(trials)
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        worker = t.user_attrs.get("worker", "")
        w_host, _, pid = worker.rpartition(":")
        if not worker:  # under the budget lock, only a worker that died inside next_trial leaves one untagged
            why = "its worker died while taking it"
        elif w_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            why = f"its worker {worker} died during the trial (killed, or out of memory)"
        elif t._trial_id in stale:
            why = f"its worker {worker} sent no heartbeat for {GRACE_S} s (killed, or its machine lost)"
        else:
            continue
        if "run_dir" not in t.user_attrs:  # no run began: nothing to resume, and no kill to hold against it
            why = f"{why}; no run had begun, so it is discarded (the study draws or queues it again)"
            if mark_failed(opt, t._trial_id, NOT_STARTED, why):
                log.warning("trial %d: %s", t.number, why)
            continue
        kills = 1 + sum(a.user_attrs.get(FAILURE) == KILLED for a in by_lineage[lineage(t)])
        if kills > MAX_KILLS:
            kind, why = GIVEN_UP, f"{why}; its worker was killed {kills} times running it, so it is not retried again " \
                                  "(does this configuration exhaust the machine's memory?)"
        else:
            kind, why = KILLED, f"{why}; retried from its last checkpoint"
        if mark_failed(opt, t._trial_id, kind, why):
            log.warning("trial %d: %s", t.number, why)
    for attempts in lineages(opt.get_trials(deepcopy=False)).values():
        last = max(attempts, key=lambda a: a.number)
        if all(a.state == TrialState.FAIL for a in attempts) and last.user_attrs.get(FAILURE) in RETRIED:
            requeue(opt, last)


def enqueue_grid(opt: optuna.Study, study: Study) -> None:
    """Queue the next grid point not already in the study, when no trial waits: a retry, which resumes a
    partly trained run, goes before the points nobody started (Optuna takes waiting trials in order)."""
    trials = opt.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return
    present = [t.params or t.system_attrs.get("fixed_params", {}) for t in trials
               if "failed_trial" not in t.system_attrs and t.user_attrs.get(FAILURE) not in DISCARDED]
    for point in study.grid:
        if not any(all(p.get(k) == v for k, v in point.items()) for p in present):
            opt.enqueue_trial(point)
            return


def next_trial(opt: optuna.Study, study: Study, storage: SweepStorage) -> tuple[optuna.Trial, dict] | None:
    """Under the budget lock: a queued trial (grid point or retry), a newly sampled configuration the study
    has not tried while the budget lasts, or None when the study is done."""
    for _ in range(MAX_DRAWS):
        trials = opt.get_trials(deepcopy=False)
        if not any(t.state == TrialState.WAITING for t in trials) and budget_used(trials) >= study.n_trials:
            return None
        trial = opt.ask()
        storage.record_heartbeat(trial._trial_id)  # then tag it: a tagged trial is one a dead worker's check sees
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        system = opt._storage.get_trial(trial._trial_id).system_attrs
        params = study.suggest(trial)
        if "fixed_params" in system or "failed_trial" in system:
            return trial, params
        twin = duplicate_of(trial.params, trial.number, trials, lineage)
        if twin is None:
            return trial, params
        trial.set_user_attr(FAILURE, DUPLICATE)
        trial.set_user_attr("fail_reason", f"the sampler proposed trial {twin}'s configuration again; discarded before it started")
        opt.tell(trial, state=TrialState.FAIL)
        log.info("trial %d: the sampler proposed trial %d's configuration again; drawing another", trial.number, twin)
    log.warning("the sampler proposed only configurations the study has tried (%d draws in a row): the search space "
                "looks exhausted; stopping", MAX_DRAWS)
    return None


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

    def __init__(self, study: Study, study_dir: Path, storage: SweepStorage, *, use_wandb: bool):
        self.study, self.study_dir, self.storage, self.use_wandb = study, study_dir, storage, use_wandb

    def train(self, trial: optuna.Trial, params: dict) -> list[float] | float:
        study = self.study
        number = lineage(self.storage.optuna.get_trial(trial._trial_id))
        run_name = f"trial-{number:04d}"
        run_dir = self.study_dir / "runs" / run_name
        cfg = study.trial_config(params, [f"run.out_dir={run_dir.parent}", f"run.name={run_name}"])
        cfg.run.wandb.group = cfg.run.wandb.group or study.name
        if not self.use_wandb:
            cfg.run.wandb.mode = "disabled"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("config_params", params)
        log.info("trial %d (%s): %s", trial.number, run_name, params)
        tracker = WandbRun(cfg, run_dir, run_id=f"{study.name}-{run_name}", name=run_name,
                           extra_config={"trial": number, "study": study.name, "params": params})
        outcome, reason = "failed", None
        try:
            results = train(cfg, callbacks=[tracker, PruningReporter(trial, study.prune_metric)])
            outcome = "finished"
        except optuna.TrialPruned:
            outcome = "pruned"
            raise
        except (Interrupted, SystemExit):
            outcome = "interrupted"
            raise
        except Exception as err:
            reason = describe(err)
            raise
        finally:
            tracker.finish(outcome, reason)
        trial.set_user_attr("summary", results["summary"])
        values = [results["summary"][o.metric] for o in study.objectives]
        return values if study.multi_objective else values[0]

    def run(self, opt: optuna.Study, trial: optuna.Trial, params: dict) -> tuple[str, str | None]:
        """Run and tell; returns ("complete" | "pruned" | TRIAL | ENVIRONMENT, the failure's reason)."""
        with self.storage.heartbeat(trial._trial_id):
            try:
                values = self.train(trial, params)
            except optuna.TrialPruned as err:
                log.info("trial %d pruned: %s", trial.number, err)
                opt.tell(trial, state=TrialState.PRUNED)
                return "pruned", None
            except (Interrupted, SystemExit) as err:  # SystemExit: e.g. submitit requeueing a preempted Slurm job
                cause = f"by {err}" if isinstance(err, Interrupted) else "by an exit request (a time limit or preemption)"
                mark_failed(opt, trial._trial_id, INTERRUPTED,
                            f"interrupted {cause}; resumes from its last checkpoint when the sweep is re-run")
                raise
            except Exception as err:
                kind, reason = failure_kind(err), describe(err)
                if kind == ENVIRONMENT:
                    reason += " (a problem of the environment: retried, not counted toward n_trials)"
                log.error("trial %d failed: %s", trial.number, reason, exc_info=kind == ENVIRONMENT)
                mark_failed(opt, trial._trial_id, kind, reason)
                return kind, reason
        try:
            opt.tell(trial, values)
        except UpdateFinishedTrialError:
            log.warning("trial %d finished after another worker declared it dead; its retry reads the results "
                        "from the run directory", trial.number)
        return "complete", None


def run_worker(study: Study, storage: SweepStorage, study_dir: Path, *, use_wandb: bool = True) -> int:
    """Take trials until none is left; returns the process exit code (EXIT_ENVIRONMENT when a lasting
    problem of the environment stopped it)."""
    opt = open_study(study, storage)
    runner = TrialRunner(study, study_dir, storage, use_wandb=use_wandb)
    in_a_row = 0
    while True:
        interrupts.check()
        try:
            with storage.budget_lock(study.name):
                reconcile(opt, storage)
                if study.grid:
                    enqueue_grid(opt, study)
                picked = next_trial(opt, study, storage)
            if picked is None:
                break
            outcome, reason = runner.run(opt, *picked)
        except STORAGE_ERRORS as err:
            outcome, reason = ENVIRONMENT, f"storage {storage.display}: {describe(err).splitlines()[0]}"
            log.error("worker %d: %s", os.getpid(), reason)
        if outcome != ENVIRONMENT:
            in_a_row = 0
            continue
        in_a_row += 1
        if in_a_row >= MAX_ENV_FAILURES:
            log.error("worker %d: stopping after %d failures of the environment in a row; the last: %s. Fix the cause "
                      "and re-run the same command: these trials did not use the budget and resume from their "
                      "checkpoints", os.getpid(), in_a_row, reason)
            return EXIT_ENVIRONMENT
        interrupts.sleep(BACKOFF_S * in_a_row)
    log.info("worker %d: no trials left in study '%s'", os.getpid(), study.name)
    return 0
