"""What the sweep tests share: launching (in this process or as a real launcher process), reading a
study back from its storage, run directories and offline W&B records, and a PostgreSQL server when CI has one."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from forde.sweep.launch import main
from forde.sweep.lifecycle import DISCARDED, Ledger
from forde.sweep.storage import SweepStorage

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "sweeps" / "studies"
WANDB = [sys.executable, "-m", "wandb"]  # the wandb CLI of this environment, wherever its scripts were installed
FAST = ["optim.epochs=3", "model.hidden=[32]", "eval.corruptions=[none]"]


def launch(tmp_path, *args, study="quickstart"):
    return main(["--study", study, "--out", str(tmp_path / "studies"), *args], studies_dir=STUDIES)


def launch_cmd(tmp_path, *args, study="quickstart"):
    return [
        sys.executable,
        str(REPO / "sweeps" / "launch.py"),
        "--study",
        study,
        "--out",
        str(tmp_path / "studies"),
        *args,
    ]


def env_for(tmp_path, **extra):
    """A launcher's environment; without the W&B service an in-process test of this session may have started."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "FORDE_DATA": str(tmp_path / "data"), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **extra}


def start(cmd, tmp_path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """A launcher process (in `env`, else env_for(tmp_path)) whose output goes to a file (a pipe nobody reads while
    we wait would fill and block it); `output(proc)` reads it back once it has exited."""
    log = open(tmp_path / f"launcher-{time.time_ns()}.log", "w")
    env = env if env is not None else env_for(tmp_path)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, **kwargs)
    proc.log_path = log.name
    log.close()
    return proc


def output(proc: subprocess.Popen, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    return Path(proc.log_path).read_text()


def postgres_url() -> str:
    url = os.environ.get("FORDE_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("FORDE_REQUIRE_POSTGRES"):
            pytest.fail("FORDE_TEST_POSTGRES_URL is not set but PostgreSQL is required")
        pytest.skip("no PostgreSQL server (bash .ci/run starts one)")
    return url


def named_study(tmp_path, name: str, extra: str = "") -> Path:
    """A copy of the quickstart study under another name (a fresh study in a shared database)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text((STUDIES / "quickstart.yaml").read_text() + extra + f"\nname: {name}\n")
    return path


def grid_study(tmp_path, search_space_and_grid: str) -> Path:
    """grid.yaml: a study named `grid` on the quickstart config that runs the points of its grid."""
    path = tmp_path / "grid.yaml"
    path.write_text(
        "base: quickstart\nobjectives: [{metric: test/accuracy, direction: maximize}]\nsampler: {name: grid}\n"
        + search_space_and_grid
    )
    return path


def backend_args(tmp_path, backend: str, name: str) -> tuple[str | None, list[str]]:
    """(storage URL or None for the default SQLite file, launcher arguments) for a backend."""
    if backend == "postgresql":
        url = postgres_url()
    elif backend == "journal":
        url = f"journal:{tmp_path / 'shared' / 'journal.log'}"
    else:
        return None, []
    return url, ["--storage", url]


def load(tmp_path, name="quickstart", storage=None) -> optuna.Study:
    url = storage or f"sqlite:///{tmp_path / 'studies' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=SweepStorage(url).optuna)


def budget_used(trials) -> int:
    return Ledger(trials).budget_used


def epochs_trained(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def logical(trials):
    """Trials that are no retry and no discarded attempt: one per configuration the study tried."""
    return [t for t in trials if "failed_trial" not in t.system_attrs and t.user_attrs.get("failure") not in DISCARDED]


def configurations(trials) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in logical(trials)]


def wandb_record(wandb_dir: Path) -> dict:
    out = subprocess.run(
        [*WANDB, "leet", "inspect", "--summary", "--json", str(wandb_dir)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def wandb_steps(wandb_dir: Path) -> list[int]:
    out = subprocess.run(
        [*WANDB, "leet", "inspect", "--json", str(wandb_dir)], capture_output=True, text=True, check=True
    )
    records = [json.loads(line) for line in out.stdout.splitlines() if '"type":"history"' in line]
    return [r["history"]["step"]["num"] for r in records if "epoch" in r["history"]["item"]]


def wait_for(condition, timeout: float, what: str, proc=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def trained_at_least(run_dir: Path, epochs: int) -> bool:
    try:
        return len(epochs_trained(run_dir)) >= epochs
    except (OSError, ValueError):
        return False


def fill(disk: Path, leave_bytes: int) -> Path:
    """A file that takes all the free space of `disk` but `leave_bytes`."""
    free = shutil.disk_usage(disk).free - leave_bytes
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * max(free, 0))
    return filler


class FlakyProxy:
    """A TCP proxy to a real server that can go away: `outage(s)` drops every connection and refuses new ones for
    s seconds (the port is closed), as a database server that restarts or a network that fails."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self._listen()

    def _listen(self) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", self.port))
        self.port = self.server.getsockname()[1]
        self.server.listen(64)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client = server.accept()[0]
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def outage(self, seconds: float) -> None:
        self.server.close()
        with self.lock:
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.conns.clear()
        time.sleep(seconds)
        self._listen()

    def url(self, real_url: str) -> str:
        return real_url.replace(f":{self.target[1]}/", f":{self.port}/")
