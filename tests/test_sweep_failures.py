"""What failures cost a sweep, with faults injected on purpose: the environment (disk, a W&B server that does
not answer, a database dropping its connections) never uses up the budget, and bad input stops the launcher
before any data is prepared, in one line."""

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from forde.config import ConfigError, MissingDataError
from forde.errors import NonFiniteLossError
from forde.sweep.launch import gpu_devices
from forde.sweep.lifecycle import ENVIRONMENT, TRIAL, classify
from forde.sweep.options import EXIT_ENVIRONMENT
from forde.sweep.storage import SweepStorage
from sweep_support import (
    FAST,
    STUDIES,
    budget_used,
    epochs_trained,
    grid_study,
    launch,
    launch_cmd,
    load,
    named_study,
    output,
    postgres_url,
    start,
    trained_at_least,
    wait_for,
    wandb_record,
    wandb_steps,
)


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_failures_are_told_apart_the_right_way_round(tmp_path):
    """What is not positively known to be the environment is the trial's own failure (it fails once and counts):
    a bug in a model or a metric must not be retried for ever as if the machine were at fault."""
    import optuna
    import sqlalchemy.exc
    import wandb

    run_dir = tmp_path / "runs" / "trial-0000"
    for err in (
        ConfigError("optim.batch_size = 4096 ..."),
        NonFiniteLossError("training loss became nan"),
        RuntimeError("anything else"),
        KeyError("test/grad_cosine_distance"),
        ValueError("a bug"),
        FileNotFoundError(2, "No such file or directory", "/elsewhere/weights.pt"),
    ):
        assert classify(err, [tmp_path]) == TRIAL, err
    refused = sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError(111, "Connection refused"))
    storage = optuna.exceptions.StorageInternalError(
        "An exception is raised during the commit. This typically "
        "happens due to invalid data in the commit, e.g. exceeding max length."
    )
    storage.__cause__ = refused
    for err in (
        MissingDataError("data.name = 'cifar10': found neither ..."),
        PermissionError(13, "Permission denied"),
        OSError(28, "No space left on device"),
        wandb.errors.CommError("timeout"),
        refused,
        storage,
        ConnectionResetError(104, "Connection reset by peer"),
        FileExistsError(17, "File exists", str(run_dir)),
    ):  # a file in the way of the run directory
        assert classify(err, [tmp_path]) == ENVIRONMENT, err


def test_a_failing_environment_uses_no_budget_and_is_retried_once_fixed(tmp_path, caplog):
    """A trial's run directory cannot be created (a file is in the way): the trial fails for the environment, is
    retried, the worker stops after three failures in a row with a non-zero exit; fixed, the same command
    finishes the study with every trial."""
    args = ["--n-trials", "2", "--no-wandb", *FAST]
    assert launch(tmp_path, "--prepare", *args) == 0  # the study's folder, made by the launcher
    blocker = tmp_path / "studies" / "quickstart" / "runs" / "trial-0000"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    assert launch(tmp_path, *args) == EXIT_ENVIRONMENT
    trials = load(tmp_path).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 3 and all(t.user_attrs["failure"] == "environment" for t in failed)
    assert all("FileExistsError" in t.user_attrs["fail_reason"] for t in failed)
    assert budget_used(trials) == 1  # the one configuration, queued again; nothing counted as failed
    assert "stopping after 3 failures of the environment in a row" in caplog.text

    blocker.unlink()
    assert launch(tmp_path, *args) == 0
    trials = load(tmp_path).get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 2 and budget_used(trials) == 2
    assert {Path(t.user_attrs["run_dir"]).name for t in done} == {"trial-0000", "trial-0004"}
    assert epochs_trained(blocker) == [1, 2, 3]


class SilentServer:
    """A TCP server that accepts connections and never answers: a W&B server that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    @property
    def url(self):
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        for conn in self.held:
            conn.close()
        self.sock.close()


def test_a_wandb_server_that_does_not_answer_costs_no_trial(tmp_path, monkeypatch, caplog):
    server = SilentServer()
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", server.url)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    caplog.set_level(logging.INFO, logger="forde")
    start = time.time()
    try:
        assert launch(tmp_path, "--n-trials", "1", *FAST, "run.wandb.init_timeout=3") == 0
    finally:
        server.close()
    assert time.time() - start < 60  # the init wait is bounded (W&B's own default is 90 s)
    [trial] = load(tmp_path).get_trials()
    assert trial.state == TrialState.COMPLETE
    assert "did not start within 3s" in caplog.text and "logging offline instead" in caplog.text
    [wandb_dir] = Path(trial.user_attrs["run_dir"]).glob("wandb/offline-run-*")
    assert f"wandb sync {wandb_dir}" in caplog.text
    record = wandb_record(wandb_dir)
    assert record["state"] == "finished" and record["summary"]["val/nll"] == pytest.approx(trial.value)
    assert wandb_steps(wandb_dir) == [1, 2, 3]


def test_a_database_dropping_its_connections_costs_no_trial(tmp_path):
    """PostgreSQL terminates every connection of the workers, again and again, while they train."""
    url = postgres_url()
    import sqlalchemy

    name = f"hiccup_{os.getpid()}_{int(time.time())}"
    args = [
        "--n-trials",
        "2",
        "--workers",
        "2",
        "--no-wandb",
        "optim.epochs=20",
        "model.hidden=[32]",
        "eval.corruptions=[none]",
        "--storage",
        url,
    ]
    proc = start(launch_cmd(tmp_path, *args, study=str(named_study(tmp_path, name))), tmp_path)
    wait_for(lambda: trained_at_least(tmp_path / "studies" / name / "runs" / "trial-0000", 1), 240, "training", proc)
    admin = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    terminated = 0
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
        with admin.connect() as conn:
            terminated += len(
                conn.execute(
                    sqlalchemy.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).all()
            )
    stderr = output(proc, timeout=60)
    assert terminated > 0
    assert proc.returncode == 0, stderr[-3000:]
    trials = load(tmp_path, name, url).get_trials()
    assert budget_used(trials) == 2
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 2
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # a connection ended while it held the budget lock: the attempt it had just taken is discarded (not_started)
    outside = ("environment", "killed", "not_started")
    assert all(t.user_attrs.get("failure") in outside for t in failed), [t.user_attrs for t in failed]


SEED_GRID = """
search_space:
  seed: {choices: [0, 1]}
grid:
  - {seed: [0, 1]}
"""


@pytest.mark.parametrize("kind", ["sampled", "grid point"])
def test_a_worker_killed_while_taking_a_trial_costs_no_budget(tmp_path, kind):
    """kill -9 between Optuna's ask (the trial exists, RUNNING) and the worker's tag on it: the next worker
    discards that attempt instead of leaving it running for ever in a slot of the budget."""
    study_arg = str(STUDIES / "quickstart.yaml" if kind == "sampled" else grid_study(tmp_path, SEED_GRID))
    name = "quickstart" if kind == "sampled" else "grid"
    args = ["--n-trials", "2", "--no-wandb", *FAST]
    assert launch(tmp_path, "--prepare", *args, study=study_arg) == 0
    url = f"sqlite:///{tmp_path / 'studies' / name / 'study.db'}"
    dies_taking_a_trial = (
        "import os, signal\n"
        "from forde.sweep.storage import SweepStorage\n"
        "from forde.sweep.study import read_study\n"
        "from forde.sweep.worker import Sweep\n"
        f"study, storage = read_study({study_arg!r}), SweepStorage({url!r})\n"
        "sweep = Sweep(study, storage)\n"
        "with storage.budget_lock(study.name) as held:\n"
        "    sweep.carry_out(sweep.decide(), held)\n"
        "    sweep.opt.ask()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", dies_taking_a_trial]).returncode == -signal.SIGKILL
    (ghost,) = load(tmp_path, name).get_trials()
    assert ghost.state == TrialState.RUNNING and "worker" not in ghost.user_attrs

    assert launch(tmp_path, *args, study=study_arg) == 0
    trials = load(tmp_path, name).get_trials()
    assert trials[0].user_attrs["failure"] == "not_started"
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 2 and budget_used(trials) == 2
    if kind == "grid point":
        assert sorted(t.params["seed"] for t in done) == [0, 1]


def test_the_retry_of_a_killed_worker_s_trial_is_logged_with_its_run_and_reason(tmp_path, caplog):
    """The trial of a worker killed with kill -9 is failed and queued again by the next worker that looks: the log
    names the trial's run and why it was queued again (the trial was read before it failed)."""
    from forde.sweep.study import read_study
    from forde.sweep.worker import Sweep

    assert launch(tmp_path, "--prepare", "--n-trials", "2", "--no-wandb", *FAST) == 0
    sweep = Sweep(
        read_study(STUDIES / "quickstart.yaml", FAST), SweepStorage(f"sqlite:///{tmp_path}/studies/quickstart/study.db")
    )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = sweep.opt.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    trial.set_user_attr("run_dir", str(tmp_path / "studies" / "quickstart" / "runs" / "trial-0000"))
    with caplog.at_level(logging.INFO, logger="forde.sweep"):
        sweep.settle()
    queued = [r.getMessage() for r in caplog.records if "queued again" in r.getMessage()]
    assert queued == [
        f"trial 0 (run trial-0000, killed) queued again after: its worker (pid {dead.pid} on {socket.gethostname()}) "
        "died during the trial (killed, or out of memory); retried from its last checkpoint"
    ]


def write(tmp_path, name, text) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case",
    [
        "unreachable database",
        "journal on a file",
        "runs not writable",
        "YAML syntax",
        "searched key overridden",
        "a GPU that is not there",
        "GPU ids that are no numbers",
        "too short a Slurm time limit",
    ],
)
def test_bad_input_stops_before_any_data_is_prepared(tmp_path, capsys, case):
    args = []
    if case == "unreachable database":
        args = ["--storage", "postgresql://postgres@127.0.0.1:1/nothing"]
        message = r"cannot use the storage postgresql://postgres@127.0.0.1:1/nothing: .*check that the server runs"
    elif case == "journal on a file":
        args = ["--storage", f"journal:{write(tmp_path, 'a_file', '')}/journal.log"]
        message = r"storage journal:.*a_file/journal.log: cannot create .*a_file"
    elif case == "runs not writable":
        (tmp_path / "studies" / "quickstart").mkdir(parents=True)
        write(tmp_path, "studies/quickstart/study.db", "")  # a study's folder (its storage, empty so far)
        write(tmp_path, "studies/quickstart/runs", "not a folder")
        message = r"cannot write to .*studies/quickstart/runs"
    elif case == "YAML syntax":
        args = [
            "--study",
            write(tmp_path, "broken.yaml", "base: quickstart\nsearch_space:\n  a: {low: 1, high\n  b: 2\n"),
        ]
        message = r"broken.yaml: YAML syntax error at line 4, column 4: did not find expected ',' or '}'; fix that line"
    elif case == "searched key overridden":
        args = ["optim.lr=0.05"]
        message = r"the override optim.lr=0.05 sets optim.lr, which this study searches"
    elif case == "a GPU that is not there":  # without CUDA, --gpus must not quietly train on the CPU
        args = ["--gpus", "64"]
        message = r"--gpus 64: (torch sees no CUDA device on this machine; drop --gpus|no GPU 64; this machine shows)"
    elif case == "GPU ids that are no numbers":
        args = ["--gpus", "a,b"]
        message = r"--gpus a,b: expected distinct GPU ids separated by commas"
    else:
        args = ["--slurm", "time=1"]
        message = r"--slurm time: 1 is too short"
    assert launch(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "data").exists()
    if case != "runs not writable":  # the storage is checked (and created) before the study directory
        assert not (tmp_path / "studies" / "quickstart" / "study.db").exists()


def test_gpu_ids_count_among_the_visible_gpus():
    assert gpu_devices("0,1", None, 4) == ["0", "1"]
    assert gpu_devices("0, 1", "2,3", 2) == ["2", "3"]  # Slurm or the user narrowed what this process sees
    assert gpu_devices("1", "GPU-5d0c,GPU-77a1", 2) == ["GPU-77a1"]
    for gpus, visible, count, message in [
        ("0,0", None, 2, "expected distinct GPU ids"),
        ("a", None, 2, "expected distinct"),
        ("2", "0,1", 2, "no GPU 2; this machine shows 2 (ids 0-1, after CUDA_VISIBLE_DEVICES=0,1)"),
        ("0", None, 0, "torch sees no CUDA device"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            gpu_devices(gpus, visible, count)


@pytest.mark.parametrize("flag", ["--workers", "--n-trials"])
def test_worker_and_trial_counts_must_be_positive(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        launch(tmp_path, flag, "0")
    assert exit_.value.code == 2
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_relaunch_with_other_settings_says_what_changed(tmp_path, capsys, monkeypatch):
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", *FAST, "data.name=digitz") == 2  # stops before any trial
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", *FAST) == 0  # ... and binds the study to nothing
    capsys.readouterr()
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", *FAST, "optim.epochs=4") == 2
    err = capsys.readouterr().err
    assert "study 'quickstart' was started with other settings; changed: optim.epochs: 3 -> 4" in err
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "moved"))  # where the data lives is no setting of the study
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", *FAST) == 0
    assert len(load(tmp_path).get_trials()) == 1


def test_a_folder_serves_one_study(tmp_path, capsys):
    """Another storage's study of the same name in the same folder would take over its run directories: refused
    before any trial, naming the storage the folder belongs to; the folder's own study goes on."""
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", *FAST) == 0
    capsys.readouterr()
    other = f"journal:{tmp_path / 'other.log'}"
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", "--storage", other, *FAST) == 2
    err = capsys.readouterr().err
    folder = tmp_path / "studies" / "quickstart"
    assert f"{folder} holds the runs of the study 'quickstart' in sqlite:///{folder / 'study.db'}, not of one in" in err
    assert f"continue it with --storage sqlite:///{folder / 'study.db'}, or give this one its own folder" in err
    assert not (tmp_path / "other.log").exists()  # refused before that storage was made
    assert launch(tmp_path, "--n-trials", "2", "--no-wandb", *FAST) == 0
    assert len(load(tmp_path).get_trials()) == 2
    (tmp_path / "studies" / "quickstart" / "study.id").unlink()  # a folder from before ids: its runs still bind it
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", "--storage", other, *FAST) == 2
    assert launch(tmp_path, "--n-trials", "3", "--no-wandb", *FAST) == 0  # ... to the study whose trials they are
