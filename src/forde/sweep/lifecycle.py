"""The life of a trial attempt and the rules of the budget, in one module and without I/O: the named fates, the
sweep's constants, what counts as a failure of the environment, when a worker is taken for dead, and `decide`.

A *configuration* is what the budget counts: one set of parameters, tried by one or more *attempts*, each an
Optuna trial. The first attempt's number names the configuration and its run directory (runs/trial-NNNN); a
retry is a new Optuna trial with the same parameters (system attribute `failed_trial`, as Optuna's
RetryFailedTrialCallback writes it) that resumes from the run directory's checkpoint.

What became of an attempt (`fate`: its Optuna state, and for a failed one its user attribute `failure`):

    queued       WAITING: a grid point or a retry
    running      RUNNING: a worker trains it and records its heartbeat
    done         COMPLETE or PRUNED
    trial        failed by its own doing: any error not known to come from the environment (a bug in a model or
                 a metric, a config error, divergence, out of memory). Counts, never retried
    environment  failed by the environment: the storage, the disk, permissions, the network, W&B, a missing
                 dataset, a failed accelerator (which also stops its worker: the error sticks to the process)
    killed       its worker died: killed, out of memory, its machine lost
    interrupted  stopped by a signal: Ctrl-C, SIGTERM, a Slurm time limit or preemption
    given_up     the failure that used up its configuration's retries: counts, not retried
    duplicate    discarded: the sampler proposed a configuration the study has
    not_started  discarded: its worker died before its run began, or took it under a lock it had lost

environment, killed and interrupted are retried from the checkpoint; discarded attempts are part of no
configuration. The rules (`decide`, asked under the budget lock):
- a configuration counts once, however many attempts it takes: the budget is spent on configurations, never
  on failures of the environment;
- a queued attempt is taken before anything new starts (its configuration is counted already);
- a new configuration starts only while the study has fewer than n_trials: the next grid point (queued one at
  a time), else a sampled one; a grid study (`sampler: grid`) never samples and ends with its grid;
- an environment failure or a kill is retried at most MAX_RETRIES times; the next one gives the configuration
  up, listing every reason. Interruptions are free;
- a running attempt whose worker is gone is failed as killed (discarded when its run had not begun) and retried;
  a worker is gone when its process is (on its own host), or after GRACE_S without a heartbeat while the storage
  was up (elsewhere: `gone`). A worker the launcher killed on request (a second Ctrl-C) was interrupted.
"""

from __future__ import annotations

import errno
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from forde.errors import NonFiniteLossError, one_line
from forde.sweep.records import lineage, params_of

FAILURE, REASON = "failure", "fail_reason"  # user attributes of a failed attempt
STARTED = (
    "run_dir"  # user attribute set as the attempt's run begins (each attempt sets it: a retry does not inherit it)
)
WORKER = "worker"  # user attribute: host:pid of the worker that took the attempt
WORKER_START = "worker_start"  # user attribute: when that process started (its pid may be another's later)
CARRIED = ("config_params",)  # user attributes a retry inherits from the attempt it retries

QUEUED, RUNNING, DONE = "queued", "running", "done"
TRIAL, ENVIRONMENT, KILLED, INTERRUPTED, GIVEN_UP = "trial", "environment", "killed", "interrupted", "given_up"
DUPLICATE, NOT_STARTED = "duplicate", "not_started"
RETRIED = (ENVIRONMENT, KILLED, INTERRUPTED)
DISCARDED = (DUPLICATE, NOT_STARTED)


# -- the sweep's constants -------------------------------------------------------------------------------------
def _scaled(seconds: float) -> float:
    """$FORDE_SWEEP_TIME_SCALE multiplies every time below (the tests run the rules 10x faster)."""
    return seconds * float(os.environ.get("FORDE_SWEEP_TIME_SCALE", "1"))


MAX_RETRIES = 3  # failures of the environment or kills of one configuration that are retried
MAX_ENV_FAILURES = 3  # a worker stops after this many failures of the environment in a row
MAX_DRAWS = 10  # samples in a row that repeat a tried configuration before a worker says the space is exhausted
BACKOFF_S = _scaled(2.0)  # the pause after an environment failure, times the failures in a row
HEARTBEAT_S = _scaled(20)  # a running trial's worker shows it is alive this often
GRACE_S = _scaled(60)  # ... and is taken for dead after this long without a sign, while the storage was up
OUTAGE_S = _scaled(300)  # how long a storage may be away before a worker counts it as a failure of the environment
LEASE_REFRESH_S = _scaled(5)  # the journal's budget lease is renewed this often, and lost after GRACE_S


# -- what failed: the configuration, or the environment ------------------------------------------------------
# errno values that pass with waiting: a connection or a network filesystem that comes back
TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.ESTALE,
    errno.ETIMEDOUT,
    errno.ENOTCONN,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EAGAIN,
}
# errno values that say the environment failed, whatever the path: the transient ones, and those that last
ENVIRONMENT_ERRNOS = TRANSIENT_ERRNOS | {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EMFILE,
    errno.ENFILE,
}
LASTING = ("no space left", "disk is full", "diskfull", "read-only", "readonly", "permission denied", "quota")
# What a storage raises when the database or the filesystem under it fails.
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, OSError)
# An accelerator that failed (an illegal memory access, an ECC error, a lost device): the error sticks to the
# process, so every later trial of its worker would fail in seconds
ACCELERATOR_MESSAGES = (
    "cuda error",
    "cublas_status_",
    "cudnn_status_",
    "cudnn error",
    "illegal memory access",
    "uncorrectable ecc error",
    "device-side assert",
    "nccl error",
    "hip error",
    "xpu error",
)


def is_storage_error(err: BaseException) -> bool:
    """An error of the database layer (an OSError of the journal's file is judged by its errno, as any OSError)."""
    return isinstance(err, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError))


def causes(err: BaseException) -> list[BaseException]:
    """`err` and the errors the database layer wrapped in it: Optuna's StorageInternalError around SQLAlchemy's
    error, around the driver's own (`orig`)."""
    chain = [err]
    while (
        is_storage_error(chain[-1])
        and (inner := getattr(chain[-1], "orig", None) or chain[-1].__cause__) is not None
        and inner not in chain
    ):
        chain.append(inner)
    return chain


def root_cause(err: BaseException) -> BaseException:
    """The driver's or the system's own error (Optuna's StorageInternalError says "invalid data in the commit"
    for a refused connection and for a full disk alike)."""
    return causes(err)[-1]


def describe(err: BaseException) -> str:
    """'Type: first line of the message', of the root cause."""
    return one_line(root_cause(err))


def is_transient(err: BaseException) -> bool:
    """Whether waiting may cure a storage error: a connection or a filesystem that comes back, not a full disk or
    a denied write."""
    cause = root_cause(err)
    if any(word in f"{type(cause).__name__}: {cause}".lower() for word in LASTING):
        return False
    if isinstance(cause, OSError):
        return cause.errno in TRANSIENT_ERRNOS or isinstance(cause, (ConnectionError, TimeoutError))
    return any(
        isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or _after_lost_connection(e)
        for e in causes(err)
    )


def _after_lost_connection(err: BaseException) -> bool:
    """SQLAlchemy's PendingRollbackError "Can't reconnect until invalid transaction is rolled back": a query made in a
    transaction whose connection the server had just dropped (Optuna retries some queries in the same session). The
    session is rolled back and closed on the way out, so the call succeeds when made again."""
    return isinstance(err, sqlalchemy.exc.PendingRollbackError) and "reconnect" in str(err).lower()


def is_accelerator_error(err: BaseException) -> bool:
    """A failure of the GPU itself, which no later trial in the same process survives (not out of memory, which
    is the configuration's)."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in ACCELERATOR_MESSAGES)


def classify(err: BaseException, own_paths: Iterable[Path] = ()) -> str:
    """ENVIRONMENT only for what is positively known to come from outside the configuration; TRIAL for the rest
    (Optuna's default: an error nobody classified is the trial's own, fails once and counts).

    The environment: the storage, a missing dataset, W&B, the network, a failed accelerator, and an OSError whose
    errno says the system failed (disk full, read-only, permission denied, ...) or whose path is one of the
    run's own (`own_paths`: the run and study directories, the data root)."""
    from forde.config import MissingDataError

    if isinstance(err, MissingDataError) or is_storage_error(err) or _is_wandb_error(err) or is_accelerator_error(err):
        return ENVIRONMENT
    if _is_lost_peer(err):  # another process of a trial on several devices died: as if this worker had been killed
        return ENVIRONMENT
    if isinstance(err, OSError):
        if err.errno in ENVIRONMENT_ERRNOS or isinstance(err, (ConnectionError, TimeoutError)):
            return ENVIRONMENT
        paths = [Path(p).resolve() for p in own_paths]
        for name in (err.filename, err.filename2):
            if name and any(Path(name).resolve().is_relative_to(p) for p in paths):
                return ENVIRONMENT
    return TRIAL


def expected(err: BaseException) -> bool:
    """An error trials end with now and then (a bad config, divergence, out of memory, the environment): one line
    in the log; anything else comes with its traceback, to find the bug."""
    import torch

    from forde.config import ConfigError

    return isinstance(err, (ConfigError, MemoryError, NonFiniteLossError, torch.OutOfMemoryError)) or (
        classify(err) == ENVIRONMENT and not is_accelerator_error(err)
    )


def _is_lost_peer(err: BaseException) -> bool:
    import sys

    distributed = sys.modules.get("forde.distributed")  # only a trial that trained is one of several processes
    return distributed is not None and distributed.lost_peer(err) is not None


def _is_wandb_error(err: BaseException) -> bool:
    import sys

    wandb = sys.modules.get("wandb")  # W&B raised it only if it is loaded
    return wandb is not None and isinstance(err, wandb.errors.Error)


# -- is a running attempt's worker alive? ----------------------------------------------------------------------
@dataclass(frozen=True)
class Observer:
    """Who asks, and what it can see: its host, whether a process of that host still runs (pid, start), and
    since when it has seen the storage up without a break (heartbeats cannot reach a storage that is away)."""

    tag: str
    host: str
    process_alive: Callable[[int, float | None], bool]
    storage_up_since: float


def gone(t: FrozenTrial, last_beat: float, now: float, me: Observer) -> str | None:
    """Why a running attempt's worker is gone; None while it lives. On the worker's own host its process says
    (alive whatever its heartbeats); elsewhere, no heartbeat for GRACE_S seconds of storage that was up."""
    tag = t.user_attrs.get(WORKER, "")
    if not tag or tag == me.tag:
        return "its worker stopped while taking it (it died, or lost the storage)"
    host, _, pid = tag.rpartition(":")
    if host == me.host and pid.isdigit():
        if me.process_alive(int(pid), t.user_attrs.get(WORKER_START)):
            return None
        return f"its worker (pid {pid} on {host}) died during the trial (killed, or out of memory)"
    if now - max(last_beat, me.storage_up_since) > GRACE_S:
        return f"its worker (pid {pid} on {host}) sent no heartbeat for {GRACE_S:.0f} s (killed, or its machine lost)"
    return None


def fate(t: FrozenTrial) -> str:
    if t.state == TrialState.WAITING:
        return QUEUED
    if t.state == TrialState.RUNNING:
        return RUNNING
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return DONE
    return t.user_attrs.get(FAILURE, TRIAL)


# -- configurations ------------------------------------------------------------------------------------------
@dataclass
class Configuration:
    number: int
    attempts: list[FrozenTrial]  # in order, discarded ones left out
    fates: list[str]

    @property
    def last(self) -> FrozenTrial:
        return self.attempts[-1]

    @property
    def params(self) -> dict[str, Any]:
        return params_of(self.attempts[0])

    @property
    def awaiting_retry(self) -> bool:
        return self.fates[-1] in RETRIED

    def failed_outside(self) -> list[tuple[FrozenTrial, str]]:
        """The attempts lost to the environment or a kill: what the retry bound counts."""
        return [(a, f) for a, f in zip(self.attempts, self.fates) if f in (ENVIRONMENT, KILLED)]

    def failure_kind(self, cause: str) -> str:
        """What an attempt failing now for `cause` is recorded as: GIVEN_UP once the retries are used up."""
        if cause in (ENVIRONMENT, KILLED) and len(self.failed_outside()) >= MAX_RETRIES:
            return GIVEN_UP
        return cause

    def given_up_reason(self, reason: str) -> str:
        earlier = "; ".join(f"attempt {a.number}: {a.user_attrs.get(REASON, f)}" for a, f in self.failed_outside())
        return (
            f"given up after {MAX_RETRIES + 1} failures outside the configuration (the last: {reason}; before: "
            f"{earlier}). Fix the cause; the configuration counts toward n_trials"
        )


class Ledger:
    """One read of a study's trials as configurations; `fates` overrides what some attempts became (a decision
    made but not written yet)."""

    def __init__(self, trials: list[FrozenTrial], fates: dict[int, str] | None = None):
        self.trials = trials
        self.fates = {t.number: fate(t) for t in trials} | (fates or {})
        groups: dict[int, list[FrozenTrial]] = defaultdict(list)
        for t in trials:
            if self.fates[t.number] not in DISCARDED:
                groups[lineage(t)].append(t)
        self.configurations = {
            n: Configuration(n, a, [self.fates[t.number] for t in a]) for n, a in sorted(groups.items())
        }

    @property
    def budget_used(self) -> int:
        return len(self.configurations)

    def of(self, attempt: FrozenTrial) -> Configuration:
        return self.configurations[lineage(attempt)]

    def queued(self) -> list[FrozenTrial]:
        return [t for t in self.trials if self.fates[t.number] == QUEUED]

    def running(self) -> list[FrozenTrial]:
        return [t for t in self.trials if self.fates[t.number] == RUNNING]

    def duplicate_of(self, params: dict[str, Any], number: int) -> int | None:
        """Another configuration with exactly these parameters, if any."""
        return next(
            (c.number for c in self.configurations.values() if c.number != number and params and c.params == params),
            None,
        )

    def has_point(self, point: dict[str, Any]) -> bool:
        return any(all(c.params.get(k) == v for k, v in point.items()) for c in self.configurations.values())

    def given_up(self) -> list[Configuration]:
        return [c for c in self.configurations.values() if GIVEN_UP in c.fates]


# -- the decision --------------------------------------------------------------------------------------------
@dataclass
class Failure:
    attempt: FrozenTrial
    kind: str
    reason: str


@dataclass
class Decision:
    """What a worker does next, under the budget lock: fail dead workers' attempts, queue retries, queue the next
    grid point, then take a queued attempt or sample a new one; or nothing, and why."""

    fail: list[Failure] = field(default_factory=list)
    requeue: list[FrozenTrial] = field(default_factory=list)  # the last failed attempt of each configuration
    enqueue: dict[str, Any] | None = None
    take: str | None = None  # "queued" | "sample"; None: nothing to start
    done: str = ""
    ledger: Ledger | None = None  # the trials as they are once this decision is carried out


def decide(
    trials: list[FrozenTrial],
    n_trials: int,
    grid: list[dict[str, Any]],
    samples: bool,
    gone: Callable[[FrozenTrial], str | None],
    stopped: dict[str, str] | None = None,
) -> Decision:
    """The one answer to "may a worker start something now, and what?". `gone(attempt)` says why a running
    attempt's worker is gone (None while it lives); `samples` is False for a grid study; `stopped`: the workers
    (host:pid) that their launcher killed on request (a second Ctrl-C), and how: their attempts were interrupted."""
    before, d, stopped = Ledger(trials), Decision(), stopped or {}
    for t in before.running():
        if (how := stopped.get(t.user_attrs.get(WORKER, ""))) is not None and STARTED in t.user_attrs:
            d.fail.append(
                Failure(
                    t,
                    INTERRUPTED,
                    f"interrupted: {how} killed its worker; resumes from its last checkpoint when the sweep is re-run",
                )
            )
            continue
        why = gone(t)
        if why is None:
            continue
        if STARTED not in t.user_attrs:
            d.fail.append(
                Failure(
                    t,
                    NOT_STARTED,
                    f"{why}; its run had not begun, so it is discarded (the study draws or queues it again)",
                )
            )
            continue
        config = before.of(t)
        kind = config.failure_kind(KILLED)
        why = f"{why}; retried from its last checkpoint" if kind == KILLED else config.given_up_reason(why)
        d.fail.append(Failure(t, kind, why))
    ledger = d.ledger = Ledger(trials, {f.attempt.number: f.kind for f in d.fail}) if d.fail else before
    d.requeue = [c.last for c in ledger.configurations.values() if c.awaiting_retry]
    if d.requeue or ledger.queued():
        d.take = "queued"
    elif ledger.budget_used >= n_trials:
        d.done = f"the budget of {n_trials} configurations is used"
    elif (point := next((p for p in grid if not ledger.has_point(p)), None)) is not None:
        d.enqueue, d.take = point, "queued"
    elif not samples:
        d.done = f"every point of the grid ({len(grid)}) has been started"
    else:
        d.take = "sample"
    return d
