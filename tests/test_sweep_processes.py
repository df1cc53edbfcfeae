"""Sweeps with real launcher and worker processes killed on purpose (kill -9 by pid, SIGTERM, Ctrl-C), on
real SQLite, PostgreSQL (when CI starts one) and journal storage, with real wandb offline files."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from sweep_support import (
    backend_args,
    budget_used,
    configurations,
    env_for,
    epochs_trained,
    launch_cmd,
    load,
    logical,
    named_study,
    output,
    start,
    trained_at_least,
    wait_for,
    wandb_record,
    wandb_steps,
)

SMALL = ["model.hidden=[32]", "eval.corruptions=[none]"]
EPOCHS = 40  # a few tenths of a second each: long enough that no trial ends before the other is stopped


def alive(pid: int) -> bool:
    """Running (a zombie left to a parent that does not reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def running_workers(opt) -> dict[int, int]:
    """trial number -> worker pid, for the trials running now."""
    return {
        t.number: int(t.user_attrs["worker"].rpartition(":")[2])
        for t in opt.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if "worker" in t.user_attrs
    }


def test_killed_launcher_and_workers_resume_without_racing_or_repeating(tmp_path):
    """kill -9 of the launcher's whole process group with two workers mid-trial; re-running with two workers
    re-queues each dead trial exactly once, resumes both from their checkpoints into the same W&B runs, and
    samples a configuration no earlier trial had."""
    args = ["--workers", "2", "--n-trials", "3", f"optim.epochs={EPOCHS}", *SMALL]
    runs = tmp_path / "studies" / "quickstart" / "runs"
    proc = subprocess.Popen(
        launch_cmd(tmp_path, *args),
        env=env_for(tmp_path),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(
        lambda: all(trained_at_least(runs / f"trial-000{i}", 2) for i in (0, 1)), 240, "two trials at epoch 2", proc
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    import torch

    killed_at = {i: torch.load(runs / f"trial-000{i}" / "checkpoint.pt", weights_only=False)["epoch"] for i in (0, 1)}
    assert all(2 <= e < EPOCHS for e in killed_at.values())
    assert [t.state for t in load(tmp_path).get_trials()] == [TrialState.RUNNING] * 2

    out = subprocess.run(launch_cmd(tmp_path, *args), env=env_for(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "UpdateFinishedTrialError" not in out.stderr and "Traceback" not in out.stderr
    for i in (0, 1):
        assert f"resuming {runs / f'trial-000{i}'} from epoch {killed_at[i]}" in out.stderr  # resumed, not restarted
    trials = load(tmp_path).get_trials()
    killed = [t for t in trials if t.number in (0, 1)]
    assert all(t.state == TrialState.FAIL and t.user_attrs["failure"] == "killed" for t in killed)
    assert all("died during the trial" in t.user_attrs["fail_reason"] for t in killed)
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == [0, 1]  # each re-queued once, by one worker
    assert all(t.state == TrialState.COMPLETE for t in retries)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3 and budget_used(trials) == 3
    assert len(set(configurations(trials))) == 3  # the re-launch drew a new configuration
    for t in retries:
        run_dir = Path(t.user_attrs["run_dir"])
        assert epochs_trained(run_dir) == list(range(1, EPOCHS + 1))
        [wandb_dir] = run_dir.glob("wandb/offline-run-*")  # one W&B run per trial, with every epoch
        assert wandb_steps(wandb_dir) == list(range(1, EPOCHS + 1))
        assert wandb_record(wandb_dir)["state"] == "finished"
    for i in (0, 1):  # the killed session's partial copy, kept out of `wandb sync`'s way
        assert len(list((runs / f"trial-000{i}" / "wandb" / "replaced").glob("offline-run-*"))) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "journal"])
def test_two_workers_share_one_study(tmp_path, backend):
    """Two worker processes: the budget holds, no configuration repeats, each trial trains once. On the journal
    (no database server) one worker is also killed with kill -9 mid-trial: the launcher reports it and exits
    non-zero, and the other worker takes its trial over from the checkpoint."""
    name = f"share_{backend}_{os.getpid()}_{int(time.time())}"
    url, extra = backend_args(tmp_path, backend, name)
    kill_one = backend == "journal"
    args = ["--workers", "2", "--n-trials", "4", "--no-wandb", f"optim.epochs={8 if kill_one else 3}", *SMALL, *extra]
    proc = start(launch_cmd(tmp_path, *args, study=str(named_study(tmp_path, name))), tmp_path)
    victim = None
    if kill_one:
        runs = tmp_path / "studies" / name / "runs"

        def kill_a_worker_past_epoch_2() -> bool:
            nonlocal victim
            if not any(trained_at_least(d, 2) for d in runs.glob("trial-*")):
                return False
            running = running_workers(load(tmp_path, name, url))
            for number in sorted(running):
                if trained_at_least(runs / f"trial-{number:04d}", 2):
                    victim = number
                    os.kill(running[number], signal.SIGKILL)
                    return True
            return False

        wait_for(kill_a_worker_past_epoch_2, 240, "a running trial at epoch 2", proc)
    stderr = output(proc)
    trials = load(tmp_path, name, url).get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 4 and budget_used(trials) == 4  # no trial lost, none extra
    assert len(set(configurations(trials))) == 4  # no configuration twice, though both workers share the seed
    run_dirs = [t.user_attrs["run_dir"] for t in done]
    assert len(set(run_dirs)) == 4
    for d in run_dirs:
        assert epochs_trained(Path(d))[0] == 1 and len(set(epochs_trained(Path(d)))) == len(epochs_trained(Path(d)))
    if not kill_one:
        assert proc.returncode == 0, stderr[-3000:]
        assert len(trials) == 4
        finished = {line.split("worker ")[1].split(":")[0] for line in stderr.splitlines() if "no trials left" in line}
        assert len(finished) == 2  # two worker processes served the study to its end
        return
    assert proc.returncode == 1
    assert f"was killed by SIGKILL during trial {victim}; another worker finished it from its checkpoint" in stderr
    [failed] = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == victim and failed.user_attrs["failure"] == "killed"
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert Path(retry.user_attrs["run_dir"]).name == f"trial-{victim:04d}"


def term_group(pgid: int, workers) -> None:
    """SIGTERM to the process group, and once more to each worker as its launcher passes it on: the second is
    sent a moment later here, where it would otherwise often merge with the first in a busy worker."""
    os.killpg(pgid, signal.SIGTERM)
    time.sleep(0.02)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def test_a_launcher_running_its_own_trial_stops_it_on_two_quick_signals(tmp_path):
    """One worker runs inside the launcher: SIGTERM twice, 10 ms apart (before or while the first is acted
    on), stops the trial, which is recorded interrupted (not left running, to be taken for killed)."""
    args = ["--n-trials", "1", "--no-wandb", f"optim.epochs={EPOCHS}", *SMALL]
    proc = start(launch_cmd(tmp_path, *args), tmp_path)
    wait_for(
        lambda: trained_at_least(tmp_path / "studies" / "quickstart" / "runs" / "trial-0000", 1), 240, "epoch 1", proc
    )
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stderr = output(proc, timeout=120)
    assert proc.returncode == 143, stderr[-3000:]  # not killed by the second signal: the trial's record is whole
    assert "Traceback" not in stderr and "re-run the same command" in stderr, stderr[-4000:]
    trial = load(tmp_path).get_trials()[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["failure"] == "interrupted"


def ctrl_c_twice(pgid: int) -> None:
    """An impatient user: the second Ctrl-C comes while the workers are still stopping, and kills them."""
    os.killpg(pgid, signal.SIGINT)
    time.sleep(0.01)
    os.killpg(pgid, signal.SIGINT)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGTERM to the group", "Ctrl-C", "Ctrl-C twice", "kill -9"])
def test_stopping_the_launcher_stops_its_workers_and_leaves_trials_resumable(tmp_path, how):
    """SIGTERM to the launcher, SIGTERM to its process group (`timeout`, systemd: each worker gets it twice, directly
    and from the launcher), Ctrl-C (SIGINT to the terminal's process group), twice, or kill -9 of the launcher
    alone: both workers stop (no orphans), mark their trials interrupted (never killed: that counts toward
    giving a configuration up), and nothing prints a traceback."""
    args = [
        "--workers",
        "2",
        "--n-trials",
        "2",
        "--no-wandb",
        f"optim.epochs={EPOCHS}",
        *SMALL,
    ]  # long enough to be stopped
    runs = tmp_path / "studies" / "quickstart" / "runs"
    proc = start(launch_cmd(tmp_path, *args), tmp_path, start_new_session=True)
    wait_for(
        lambda: all(trained_at_least(runs / f"trial-000{i}", 1) for i in (0, 1)), 240, "two trials at epoch 1", proc
    )
    workers = running_workers(load(tmp_path))
    assert len(workers) == 2
    {
        "SIGTERM": lambda: proc.send_signal(signal.SIGTERM),
        "SIGTERM to the group": lambda: term_group(proc.pid, workers.values()),
        "Ctrl-C": lambda: os.killpg(proc.pid, signal.SIGINT),
        "Ctrl-C twice": lambda: ctrl_c_twice(proc.pid),
        "kill -9": proc.kill,
    }[how]()
    stderr = output(proc, timeout=120)
    assert (
        proc.returncode
        == {"SIGTERM": 143, "SIGTERM to the group": 143, "Ctrl-C": 130, "Ctrl-C twice": 130, "kill -9": -9}[how]
    )
    wait_for(lambda: not any(alive(pid) for pid in workers.values()), 60, "the workers to exit")
    assert "Traceback" not in stderr, stderr
    if how != "kill -9":
        assert "re-run the same command" in stderr
    trials = load(tmp_path).get_trials()
    stopped = [t for t in trials if t.number in (0, 1)]
    assert all(t.state == TrialState.FAIL and t.user_attrs["failure"] == "interrupted" for t in stopped)
    reasons = ("interrupted by SIGTERM", "a second SIGINT to the launcher killed its worker")
    assert all(any(r in t.user_attrs["fail_reason"] for r in reasons[: 1 + (how == "Ctrl-C twice")]) for t in stopped)
    assert len(logical(trials)) == 2
    if how != "kill -9":  # the launcher queued them to resume; after kill -9 the next launch does
        assert [t.system_attrs["failed_trial"] for t in trials if t.state == TrialState.WAITING] == [0, 1]
    if how != "SIGTERM":
        return
    out = subprocess.run(launch_cmd(tmp_path, *args), env=env_for(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = load(tmp_path).get_trials()
    assert budget_used(trials) == 2 and sum(t.state == TrialState.COMPLETE for t in trials) == 2
    for i in (0, 1):
        assert f"resuming {runs / f'trial-000{i}'} from epoch" in out.stderr
        assert epochs_trained(runs / f"trial-000{i}") == list(range(1, EPOCHS + 1))
    assert len(logical(trials)) == 2
