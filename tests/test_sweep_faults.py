"""A trial's life under faults, end to end: an error nobody classified, budgets of grid studies, workers that die
at the worst moment, a trial finished after it was declared dead, a signal while W&B is slow, a database that
goes away, a disk that fills up, heartbeats on a journal."""

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import forde.sweep.heartbeats as heartbeats
import forde.sweep.outages as outages
import forde.tracking
import forde.train
from forde.sweep.lifecycle import describe
from forde.sweep.options import EXIT_ENVIRONMENT
from forde.sweep.storage import SweepStorage, driver_url
from sweep_support import (
    REPO,
    STUDIES,
    FlakyProxy,
    budget_used,
    env_for,
    epochs_trained,
    fill,
    grid_study,
    launch,
    launch_cmd,
    load,
    named_study,
    output,
    postgres_url,
    start,
    wait_for,
)

SEEDS = """
search_space:
  seed: {choices: [0, 1, 2, 3]}
grid:
  - {seed: [0, 1, 2, 3]}
"""
QUICK = ["--no-wandb", "optim.epochs=1", "model.hidden=[16]", "eval.corruptions=[none]"]


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def trainer(monkeypatch, wrap):
    """Replace the training function the sweep calls with `wrap(real_train)`."""
    fake = wrap(forde.train.train)
    monkeypatch.setattr(forde.train, "train", fake)  # the worker imports it when it trains


def test_an_error_nobody_classified_fails_its_trial_once_and_the_sweep_goes_on(tmp_path, monkeypatch, caplog):
    """A bug in a user's model or metric (here a KeyError for seed 1) is the trial's own failure: it fails once,
    counts, is not retried, and the other configurations run; its traceback is in the log."""

    def with_a_bug(real):
        def train(cfg, callbacks=(), **kwargs):
            if cfg.seed == 1:
                raise KeyError("test/grad_cosine_distance")
            return real(cfg, callbacks, **kwargs)

        return train

    trainer(monkeypatch, with_a_bug)
    assert launch(tmp_path, *QUICK, study=str(grid_study(tmp_path, SEEDS))) == 0
    trials = load(tmp_path, "grid").get_trials()
    assert sorted((t.params["seed"], t.state) for t in trials) == [
        (0, TrialState.COMPLETE),
        (1, TrialState.FAIL),
        (2, TrialState.COMPLETE),
        (3, TrialState.COMPLETE),
    ]
    [failed] = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.user_attrs["failure"] == "trial" and "KeyError" in failed.user_attrs["fail_reason"]
    assert budget_used(trials) == 4
    assert "Traceback" in caplog.text and "failed (the trial itself)" in caplog.text


def test_a_study_of_gradient_diversity_with_one_member_ensembles_is_refused_before_training(tmp_path, capsys):
    path = tmp_path / "diversity.yaml"
    path.write_text(
        "name: diversity\nbase: quickstart\nn_trials: 2\nconfig: {method: {name: de}}\n"
        "objectives: [{metric: test/grad_cosine_distance, direction: maximize}]\n"
        "search_space:\n  ensemble_size: {choices: [1, 3]}\n"
    )
    assert launch(tmp_path, *QUICK, study=str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "search_space.ensemble_size: an ensemble of 1 member has no gradient diversity, which objective "
        "'test/grad_cosine_distance' measures; use ensembles of 2 or more members"
    )
    assert not (tmp_path / "data").exists()


def test_a_grid_study_keeps_to_its_budget_and_to_its_grid(tmp_path):
    path = grid_study(tmp_path, SEEDS)
    assert launch(tmp_path, "--n-trials", "2", *QUICK, study=str(path)) == 0
    assert sorted(t.params["seed"] for t in load(tmp_path, "grid").get_trials()) == [0, 1]
    two = tmp_path / "two.yaml"  # n_trials past the grid: the grid, and no point off it
    two.write_text(
        path.read_text().replace(
            "[0, 1, 2, 3]}\ngrid:\n  - {seed: [0, 1, 2, 3]}", "[0, 1, 2, 3]}\ngrid:\n  - {seed: [0, 1]}"
        )
        + "n_trials: 6\nname: two\n"
    )
    assert launch(tmp_path, *QUICK, study=str(two)) == 0
    trials = load(tmp_path, "two").get_trials()
    assert sorted(t.params["seed"] for t in trials) == [0, 1] and all(t.state == TrialState.COMPLETE for t in trials)


DIES_TAKING_ITS_TRIAL = """
import os, signal, sys
import forde.sweep.worker as worker
from pathlib import Path
worker.TrialRunner.run = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from forde.sweep.launch import main
sys.exit(main(sys.argv[1:], studies_dir=Path(sys.argv[0]).parent))
"""


def test_a_retry_whose_worker_dies_before_its_run_begins_is_discarded_not_killed(tmp_path, monkeypatch):
    """A stopped trial's retry is taken by a worker that dies before the run begins (kill -9 between taking and
    training): that attempt is discarded, not counted as a kill, and the next launch resumes the trial."""
    real_save, stopped = forde.train.save_checkpoint, []

    def stop_after_the_first_save(state, run_dir):
        real_save(state, run_dir)
        if not stopped:
            stopped.append(run_dir)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(forde.train, "save_checkpoint", stop_after_the_first_save)
    args = ["--n-trials", "1", "--no-wandb", "optim.epochs=2", "model.hidden=[16]", "eval.corruptions=[none]"]
    assert launch(tmp_path, *args) == 128 + signal.SIGTERM
    script = tmp_path / "dies.py"
    script.write_text(DIES_TAKING_ITS_TRIAL)
    for _ in range(2):
        cmd = [
            sys.executable,
            str(script),
            "--study",
            str(STUDIES / "quickstart.yaml"),
            "--out",
            str(tmp_path / "studies"),
            *args,
        ]
        assert subprocess.run(cmd, env=env_for(tmp_path), capture_output=True).returncode == -signal.SIGKILL
    assert launch(tmp_path, *args) == 0
    trials = load(tmp_path).get_trials()
    assert [t.user_attrs.get("failure") for t in trials] == ["interrupted", "not_started", "not_started", None]
    assert trials[-1].state == TrialState.COMPLETE and budget_used(trials) == 1
    assert epochs_trained(stopped[0]) == [1, 2]


def test_a_trial_that_finishes_after_it_was_declared_dead_is_no_failure(tmp_path, monkeypatch, caplog):
    """Another worker declared this trial's worker dead (a heartbeat missed on a stalled machine) while it was
    still training; it then finishes. Its results stay in the run directory, the retry reads them, nothing is
    counted as a failure of the environment, and no traceback is logged."""
    url = f"sqlite:///{tmp_path / 'studies' / 'quickstart' / 'study.db'}"

    def declared_dead_meanwhile(real):
        def train(cfg, callbacks=(), **kwargs):
            results = real(cfg, callbacks, **kwargs)
            if (Path(cfg.run.out_dir) / "declared").exists():
                return results
            (Path(cfg.run.out_dir) / "declared").touch()
            backend = SweepStorage(url).optuna
            study_id = backend.get_study_id_from_name("quickstart")
            [t] = [t for t in backend.get_all_trials(study_id) if t.state == TrialState.RUNNING]
            trial_id = backend.get_trial_id_from_study_id_trial_number(study_id, t.number)
            backend.set_trial_user_attr(trial_id, "failure", "killed")
            backend.set_trial_user_attr(trial_id, "fail_reason", "its worker sent no heartbeat for 60 s")
            backend.set_trial_state_values(trial_id, TrialState.FAIL)
            return results

        return train

    trainer(monkeypatch, declared_dead_meanwhile)
    caplog.set_level(logging.INFO, logger="forde")
    assert launch(tmp_path, "--n-trials", "1", *QUICK) == 0
    assert "finished after another worker declared it dead" in caplog.text
    assert "Traceback" not in caplog.text and "failure of the environment" not in caplog.text
    trials = load(tmp_path).get_trials()  # the retry read the finished run
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE] and budget_used(trials) == 1


def test_a_stopped_trial_is_recorded_before_its_tracker_finishes(tmp_path, monkeypatch):
    """On Slurm, KillWait may end a worker while W&B finishes (online, slowly): the storage must already say
    interrupted, or the trial is later taken for a killed one."""
    url = f"sqlite:///{tmp_path / 'studies' / 'quickstart' / 'study.db'}"
    seen = []

    def finish(self, outcome="finished", reason=None):
        [t] = optuna.load_study(study_name="quickstart", storage=url).get_trials()
        seen.append((outcome, t.state, t.user_attrs.get("failure")))

    monkeypatch.setattr(forde.tracking.WandbRun, "finish", finish)
    real_save = forde.train.save_checkpoint

    def stop_after_the_first_save(state, run_dir):
        real_save(state, run_dir)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(forde.train, "save_checkpoint", stop_after_the_first_save)
    assert (
        launch(
            tmp_path, "--n-trials", "1", "--no-wandb", "optim.epochs=3", "model.hidden=[16]", "eval.corruptions=[none]"
        )
        == 128 + signal.SIGTERM
    )
    assert seen == [("interrupted", TrialState.FAIL, "interrupted")]


def test_storage_errors_are_described_by_their_cause():
    """Optuna wraps a refused connection (and a full disk) in 'invalid data in the commit'; the reason given is
    the driver's own."""
    import sqlalchemy.exc

    for cause, text in [
        (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
        (OSError(28, "No space left on device"), "No space left on device"),
    ]:
        err = optuna.exceptions.StorageInternalError(
            "An exception is raised during the commit. This typically "
            "happens due to invalid data in the commit, e.g. exceeding max "
            "length."
        )
        err.__cause__ = sqlalchemy.exc.OperationalError("INSERT ...", {}, cause)
        assert text in describe(err) and "invalid data" not in describe(err)


def test_a_query_after_a_dropped_connection_is_waited_out():
    """Optuna retries some queries in the session whose connection the server just dropped; SQLAlchemy then refuses
    with PendingRollbackError, and the session is rolled back on the way out: the next call works."""
    import sqlalchemy.exc

    from forde.sweep.lifecycle import is_transient

    err = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    err.__cause__ = sqlalchemy.exc.PendingRollbackError(
        "Can't reconnect until invalid transaction is rolled back.  Please rollback() fully before proceeding"
    )
    assert is_transient(err)
    err.__cause__ = sqlalchemy.exc.PendingRollbackError(
        "This Session's transaction has been rolled back due to a flush"
    )
    assert not is_transient(err)  # a failed write of our own: waiting does not cure it


def test_postgresql_urls_name_the_driver_the_extra_installs():
    assert driver_url("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    assert driver_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    url = postgres_url()
    assert SweepStorage(url).optuna.engine.url.drivername == "postgresql+psycopg"


def test_the_launcher_waits_out_a_storage_error_after_its_workers_exit(tmp_path, monkeypatch, capsys):
    """The database drops the launcher's connection while it settles its workers' trials and writes the summary
    (the workers had waited it out): the launcher tries again instead of ending with exit 3."""
    import sqlalchemy.exc

    from forde.sweep.launch import finish, spawn_workers
    from forde.sweep.study import read_study
    from forde.sweep.worker import Sweep

    monkeypatch.setattr(outages.interrupts, "sleep", lambda s: None)
    sweep = Sweep(read_study(STUDIES / "quickstart.yaml"), SweepStorage(f"sqlite:///{tmp_path / 'study.db'}"))
    read, failed = sweep.trials, []

    def dropped_once():
        if not failed:
            failed.append(True)
            raise sqlalchemy.exc.OperationalError(
                "SELECT ...", {}, Exception("terminating connection due to administrator command")
            )
        return read()

    monkeypatch.setattr(sweep, "trials", dropped_once)
    assert spawn_workers(None, [], sweep) == 0 and failed  # no workers: what follows them
    failed.clear()
    assert finish(sweep, tmp_path, 0) == 0 and failed
    assert (tmp_path / "best.md").is_file() and "configurations" in capsys.readouterr().out


def test_a_database_outage_between_trials_is_waited_out(tmp_path):
    """The database goes away for 20 s (connections dropped, the port closed) between and during short trials:
    the worker waits, nothing fails, the study ends with every trial."""
    url = postgres_url()
    from sqlalchemy.engine import make_url

    real = make_url(url)
    proxy = FlakyProxy(real.host, real.port)
    name = f"outage_{os.getpid()}_{int(time.time())}"
    args = [
        "--n-trials",
        "3",
        "--storage",
        proxy.url(url),
        "--no-wandb",
        "optim.epochs=2",
        "model.hidden=[16]",
        "eval.corruptions=[none]",
    ]
    proc = start(launch_cmd(tmp_path, *args, study=str(named_study(tmp_path, name))), tmp_path)

    def one_done() -> bool:
        try:
            return any(t.state == TrialState.COMPLETE for t in load(tmp_path, name, url).get_trials())
        except KeyError:  # the study is not created yet
            return False

    wait_for(one_done, 240, "a first trial", proc)
    proxy.outage(20)
    stderr = output(proc, timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "storage unavailable" in stderr and "Traceback" not in stderr
    trials = load(tmp_path, name, url).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3 and budget_used(trials) == 3


def test_a_full_disk_is_one_line_naming_the_file_and_costs_no_budget(tmp_path, small_disk_factory):
    """The disk of the study fills up while a checkpoint is written: the partial file is removed (which lets the
    study's own database record the failure), the trial is a failure of the environment (not a kill), the worker
    stops after three in a row with exit code 3 and one line naming the cause and the file; once space is freed,
    the same command finishes the study."""
    disk = small_disk_factory(16 << 20)
    cmd = [
        sys.executable,
        str(REPO / "sweeps" / "launch.py"),
        "--study",
        "quickstart",
        "--out",
        str(disk),
        "--no-wandb",
        "optim.epochs=2",
        "model.hidden=[512]",
        "eval.corruptions=[none]",
    ]
    first = subprocess.run([*cmd, "--n-trials", "1"], env=env_for(tmp_path), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    filler = fill(disk, leave_bytes=0)  # not even room for the database: the launcher says so
    out = subprocess.run([*cmd, "--n-trials", "2"], env=env_for(tmp_path), capture_output=True, text=True)
    assert out.returncode in (2, EXIT_ENVIRONMENT) and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("launch.py: ") and "full" in out.stderr.splitlines()[-1]
    filler.unlink()
    filler = fill(disk, leave_bytes=512 << 10)  # room for the database and its log, not for a checkpoint
    out = subprocess.run([*cmd, "--n-trials", "2"], env=env_for(tmp_path), capture_output=True, text=True)
    assert out.returncode == EXIT_ENVIRONMENT, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    run_dir = disk / "quickstart" / "runs" / "trial-0001"
    assert re.search(rf"OSError: \[Errno 28\] No space left on device.*{run_dir}", out.stderr)
    assert "stopping after 3 failures of the environment in a row" in out.stderr
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
    trials = load(tmp_path, storage=f"sqlite:///{disk / 'quickstart' / 'study.db'}").get_trials()
    assert [t.user_attrs.get("failure") for t in trials[1:4]] == ["environment"] * 3
    assert trials[4].state == TrialState.WAITING  # its retry, queued to resume
    assert budget_used(trials) == 2
    filler.unlink()
    again = subprocess.run([*cmd, "--n-trials", "2"], env=env_for(tmp_path), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load(tmp_path, storage=f"sqlite:///{disk / 'quickstart' / 'study.db'}").get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2 and budget_used(trials) == 2


def test_heartbeats_do_not_grow_the_journal(tmp_path, monkeypatch):
    """A beat every 50 ms during a trial of a few seconds: the journal holds the trial's own records only."""
    sizes = {}
    for beat_s in (3600, 0.05):
        monkeypatch.setattr(heartbeats, "HEARTBEAT_S", beat_s)
        journal = tmp_path / f"journal-{beat_s}.log"
        assert (
            launch(
                tmp_path,
                "--n-trials",
                "1",
                "--storage",
                f"journal:{journal}",
                "--out",
                str(tmp_path / f"studies-{beat_s}"),
                "--no-wandb",
                "optim.epochs=8",
                "model.hidden=[32]",
                "eval.corruptions=[none]",
            )
            == 0
        )
        sizes[beat_s] = journal.stat().st_size
    assert abs(sizes[0.05] - sizes[3600]) < 2048, sizes


def test_a_full_disk_while_the_inputs_are_prepared_is_one_line(tmp_path, monkeypatch, capsys, small_disk_factory):
    disk = small_disk_factory(64 << 10)  # the data root: the digits and their corrupted sets do not fit
    monkeypatch.setenv("FORDE_DATA", str(disk))
    assert launch(tmp_path, "--n-trials", "1", *QUICK[:-1]) == EXIT_ENVIRONMENT
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert "Traceback" not in err and last.startswith("launch.py: OSError: [Errno 28] No space left on device")
    assert str(disk) in last and last.endswith("fix it and re-run the same command")
