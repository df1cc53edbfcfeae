"""Never two live copies of a trial, and no decision under a lost lock: the liveness rule, the run directory's lock,
a worker that learns it was taken for dead, budget decisions whose lock was lost meanwhile, the journal lease's
refresher, PostgreSQL's lock of a stopped holder, and a storage outage longer than the grace of a heartbeat."""

import errno
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from optuna.trial import TrialState, create_trial

import forde.sweep.heartbeats as heartbeats
import forde.sweep.leases as leases
import forde.sweep.locks as locks
import forde.train
from forde import run_lock
from forde.sweep.lifecycle import GRACE_S, STARTED, WORKER, WORKER_START, Observer, gone
from forde.sweep.storage import SweepStorage
from forde.sweep.study import read_study
from forde.sweep.worker import Sweep, process_alive, process_start
from sweep_support import (
    STUDIES,
    FlakyProxy,
    budget_used,
    env_for,
    epochs_trained,
    launch,
    launch_cmd,
    load,
    named_study,
    output,
    postgres_url,
    start,
    wait_for,
)

QUICK = ["--no-wandb", "model.hidden=[16]", "eval.corruptions=[none]"]


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))


# -- the rule -------------------------------------------------------------------------------------------------
def running(worker: str, started: int | None = None):
    t = create_trial(state=TrialState.RUNNING, user_attrs={WORKER: worker, STARTED: "run", WORKER_START: started})
    t.number = 0
    return t


def observer(alive: bool = True, up_since: float = 0.0, host: str = "here"):
    return Observer(tag=f"{host}:1", host=host, process_alive=lambda pid, start: alive, storage_up_since=up_since)


def test_on_its_own_host_a_live_worker_is_alive_whatever_its_heartbeats():
    now = 10_000.0
    silent = now - 10 * GRACE_S  # no heartbeat for ten grace periods: the storage was away, or the beats lost
    assert gone(running("here:42"), silent, now, observer(alive=True)) is None
    assert "died during the trial" in gone(running("here:42"), now, now, observer(alive=False))


def test_a_pid_taken_by_another_process_is_not_the_worker():
    me = os.getpid()
    assert process_alive(me, process_start(me)) and process_alive(me, None)
    assert not process_alive(me, process_start(me) + 1)  # the same pid, started at another time


def test_elsewhere_silence_counts_only_while_the_storage_was_up():
    now = 10_000.0
    last_beat = now - 5 * GRACE_S
    # the storage came back a moment ago: the worker's beats could not reach it before
    assert gone(running("there:42"), last_beat, now, observer(up_since=now - GRACE_S / 2)) is None
    # up for longer than the grace, and still no beat
    assert "sent no heartbeat" in gone(running("there:42"), last_beat, now, observer(up_since=now - 2 * GRACE_S))


# -- the run directory's lock ---------------------------------------------------------------------------------
HOLDS = """
import sys, time
from pathlib import Path
from forde import run_lock
with run_lock.hold(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path):
    run = tmp_path / "runs" / "trial-0000"
    proc = subprocess.Popen([sys.executable, "-c", HOLDS, str(run), "3"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(run_lock.RunLocked, match=rf"run directory {run} is being trained by \S+:{proc.pid}; wait"):
        with run_lock.hold(run):
            pass
    waited: list[str] = []
    with run_lock.hold(run, waiting=waited.append):  # a sweep's retry waits for the first copy to stop
        assert waited and waited[0].endswith(f":{proc.pid}")  # ... until the first process let go
        with run_lock.hold(run):  # the same process: re-entrant (train() inside a worker's hold)
            pass
    assert proc.wait(30) == 0


# -- a worker taken for dead while it trains --------------------------------------------------------------------
def test_a_worker_taken_for_dead_stops_its_copy_and_the_retry_resumes_it(tmp_path, monkeypatch, caplog):
    """Another worker failed this trial as killed while it trained (its heartbeats were lost): at its next beat the
    worker finds out and stops; the retry resumes from the checkpoint and no epoch is trained twice."""
    url = f"sqlite:///{tmp_path / 'studies' / 'quickstart' / 'study.db'}"
    monkeypatch.setattr(heartbeats, "HEARTBEAT_S", 0.05)
    real_save, declared = forde.train.save_checkpoint, []

    def declared_dead_after_the_first_epoch(state, run_dir):
        real_save(state, run_dir)
        if not declared:
            declared.append(run_dir)
            records = SweepStorage(url).records("quickstart")
            records.fail(0, {"failure": "killed", "fail_reason": "its worker sent no heartbeat for 60 s"})
            time.sleep(0.5)  # the next beats find it failed before the epoch ends

    monkeypatch.setattr(forde.train, "save_checkpoint", declared_dead_after_the_first_epoch)
    caplog.set_level(logging.INFO, logger="forde")
    assert launch(tmp_path, "--n-trials", "1", *QUICK, "optim.epochs=3") == 0
    assert "trial 0 was taken over while it ran" in caplog.text and "Traceback" not in caplog.text
    trials = load(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE] and budget_used(trials) == 1
    assert epochs_trained(declared[0]) == [1, 2, 3]


# -- decisions under a lost lock --------------------------------------------------------------------------------
def two_sweeps(tmp_path, monkeypatch, n_trials: int = 1) -> tuple[Sweep, Sweep]:
    """Two workers of one journal study, as if on two machines; their budget lease expires after 0.3 s and is
    never renewed (a holder stopped by SIGSTOP)."""
    monkeypatch.setattr(locks, "GRACE_S", 0.3)
    monkeypatch.setattr(locks, "LEASE_REFRESH_S", 3600)
    study = read_study(STUDIES / "quickstart.yaml", [f"data.root={tmp_path / 'data'}"])
    study.n_trials = n_trials
    storage = f"journal:{tmp_path / 'journal.log'}"
    a, b = Sweep(study, SweepStorage(storage)), Sweep(study, SweepStorage(storage))
    b.host, b.tag = "elsewhere", "elsewhere:1"
    return a, b


def test_a_decision_whose_lock_was_lost_is_made_again(tmp_path, monkeypatch, caplog):
    """Worker A decides to sample, is stopped past the lease's life, B takes the lease and the last configuration
    of the budget; A resumes: it sees the lock lost, decides again, and starts nothing."""
    a, b = two_sweeps(tmp_path, monkeypatch)
    real_decide, taken_by_b = a.decide, []

    def stopped_after_deciding(*args):
        d = real_decide(*args)
        if not taken_by_b:
            time.sleep(0.5)  # past the lease's life
            taken_by_b.append(b.take())
        return d

    monkeypatch.setattr(a, "decide", stopped_after_deciding)
    caplog.set_level(logging.WARNING, logger="forde")
    assert a.take() is None
    assert taken_by_b[0] is not None and "lost the budget lock while deciding" in caplog.text
    assert len(a.trials()) == 1 and budget_used(a.trials()) == 1


def test_a_trial_taken_under_a_lost_lock_is_discarded(tmp_path, monkeypatch, caplog):
    """A is stopped right after Optuna's ask: B takes over the lease, and the budget's last configuration. A's
    trial is discarded (not started, no budget), and A starts nothing; no UpdateFinishedTrialError."""
    a, b = two_sweeps(tmp_path, monkeypatch)
    real_ask, taken_by_b = a.opt.ask, []

    def stopped_after_asking(*args, **kwargs):
        trial = real_ask(*args, **kwargs)
        if not taken_by_b:
            time.sleep(0.5)
            taken_by_b.append(b.take())
        return trial

    monkeypatch.setattr(a.opt, "ask", stopped_after_asking)
    caplog.set_level(logging.WARNING, logger="forde")
    assert a.take() is None
    trials = a.trials()
    assert trials[0].user_attrs["failure"] == "not_started" and "lost" in trials[0].user_attrs["fail_reason"]
    assert taken_by_b[0][0].number == 1 and budget_used(trials) == 1


def test_the_lease_is_renewed_through_a_passing_filesystem_error(tmp_path, monkeypatch, caplog):
    real_utime, failures = os.utime, [0]

    def stalls_twice(path, *args, **kwargs):
        if failures[0] < 2:
            failures[0] += 1
            raise OSError(errno.ESTALE, "Stale file handle", str(path))
        return real_utime(path, *args, **kwargs)

    monkeypatch.setattr(leases.os, "utime", stalls_twice)
    caplog.set_level(logging.WARNING, logger="forde")
    with leases.FileLease(tmp_path / "lease", ttl_s=1.0, refresh_s=0.1) as lease:
        time.sleep(1.5)  # past the TTL: only the renewals after the errors keep it
        assert lease.held() and failures[0] == 2
    assert "could not be renewed (Stale file handle); trying again" in caplog.text
    assert "was lost" not in caplog.text


# -- PostgreSQL -------------------------------------------------------------------------------------------------
def test_a_stopped_holder_of_the_postgresql_lock_blocks_nobody(monkeypatch):
    """A holder that stops inside the lock (idle in its transaction) is ended by the server after GRACE_S: the
    next worker takes the lock, and the stopped one learns at its next check that it lost it."""
    url = postgres_url()
    from sqlalchemy import create_engine

    monkeypatch.setattr(locks, "GRACE_S", 1.0)
    engine = create_engine(url)
    name = f"lock-{os.getpid()}-{time.time_ns()}"
    inside, resumed, outcome = threading.Event(), threading.Event(), []

    def stopped_holder():
        with locks.advisory_lock(engine, name) as held:
            inside.set()
            resumed.wait(30)  # stopped: no statement on the connection
            try:
                held.check()
                outcome.append("held")
            except locks.LockLost as err:
                outcome.append(str(err))

    thread = threading.Thread(target=stopped_holder)
    thread.start()
    assert inside.wait(30)
    t0 = time.monotonic()
    with locks.advisory_lock(engine, name):
        waited = time.monotonic() - t0
    resumed.set()
    thread.join()
    assert 0.5 < waited < 20 and "the server ended it" in outcome[0]


def test_a_storage_outage_longer_than_the_grace_costs_nothing(tmp_path):
    """Two workers train while the database is away for 12 s, twice the grace of a missing heartbeat (the sweep's
    times scaled by 0.1: 2 minutes of a real sweep): no trial is taken for dead or trained twice, the budget is
    exact, every trial ends (completed, or pruned by the study's pruner)."""
    url = postgres_url()
    from sqlalchemy.engine import make_url

    real = make_url(url)
    proxy = FlakyProxy(real.host, real.port)
    name = f"outage2_{os.getpid()}_{int(time.time())}"
    args = ["--n-trials", "3", "--workers", "2", "--storage", proxy.url(url), *QUICK, "optim.epochs=12"]
    proc = start(
        launch_cmd(tmp_path, *args, study=str(named_study(tmp_path, name))),
        tmp_path,
        env=env_for(tmp_path, FORDE_SWEEP_TIME_SCALE="0.1"),
    )
    runs = tmp_path / "studies" / name / "runs"
    wait_for(lambda: len(list(runs.glob("trial-*/metrics.jsonl"))) >= 2, 300, "two trials training", proc)
    proxy.outage(12)
    log = output(proc, timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert "storage unavailable" in log and "Traceback" not in log
    assert "taken over" not in log and "heartbeat for" not in log
    trials = load(tmp_path, name, url).get_trials()  # the study's median pruner may stop one
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert budget_used(trials) == 3
    for run in runs.glob("trial-*"):  # each epoch trained once, in order
        epochs = epochs_trained(run)
        assert epochs == list(range(1, len(epochs) + 1)), run
