"""Corrupted-set generation stopped part-way (a full disk, Ctrl-C, an error) leaves finished sets, no temporary
files and a provenance record that lists every set generated here, and resumes to the same files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from forde.cli import main
from forde.config import load_config
from forde.data import corrupted_sets
from forde.data.base import Split
from forde.data.corrupted import SOURCE_FILE, corrupted_root, prepare_corrupted
from forde.data.corrupted import corrupted_sets as configured_sets
from forde.data.corrupted_sets import GENERATOR_VERSION
from forde.data.corruption_names import CORRUPTIONS, SEVERITIES
from forde.data.registry import load_dataset
from forde.data.store import save_store

SRC = str(Path(__file__).resolve().parents[1] / "src")


def temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def sources(root: Path) -> dict[str, str]:
    """corruption/severity -> generated | official, for every set under root, as results.json would record it."""
    cfg = load_config("quickstart", [f"eval.corrupted_root={root}"])
    ds = load_dataset(cfg.data)
    return {f"{s.corruption}/{s.severity}": s.provenance["source"] for s in configured_sets(cfg, ds)}


def test_a_resumed_generation_records_every_set_it_generated(tmp_path, monkeypatch):
    """Stopped after 41 of the 95 sets and resumed, every set is recorded as generated (the record is written as
    each set is committed, not once at the end), and the files equal those of a generation never stopped."""
    cfg = load_config("quickstart", [f"data.root={tmp_path / 'data'}", "run.progress=false"])
    ds = load_dataset(cfg.data)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # jobs in this process, where the stop below reaches them
    real, calls = corrupted_sets.corrupt, []

    def stopped_after_41(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 41:
            raise RuntimeError("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(corrupted_sets, "corrupt", stopped_after_41)
    with pytest.raises(RuntimeError, match="stopped"):
        prepare_corrupted(cfg, ds)
    root = corrupted_root(cfg, ds)
    assert len(json.loads((root / SOURCE_FILE).read_text())["generated"]) == 41 and not temporary_files(root)
    monkeypatch.setattr(corrupted_sets, "corrupt", real)
    prepare_corrupted(cfg, ds)
    recorded = sources(root)
    assert len(recorded) == 95 and set(recorded.values()) == {"generated"}
    entries = json.loads((root / SOURCE_FILE).read_text())["generated"].values()
    assert {e["generator"] for e in entries} == {GENERATOR_VERSION}

    straight = tmp_path / "straight"
    assert (
        main(
            [
                "data",
                "corrupt",
                "--dataset",
                "digits",
                "--root",
                str(tmp_path / "data"),
                "--out",
                str(straight),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    for name in CORRUPTIONS:
        assert (root / f"{name}.npy").read_bytes() == (straight / f"{name}.npy").read_bytes(), name


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_is_one_line_naming_the_path_and_leaves_no_temporary_files(
    tmp_path, small_disk_factory, capsys, workers
):
    disk = small_disk_factory(1024 * 1024)  # the 95 digits-C sets need about 2.2 MB
    out = disk / "digits-C"
    code = main(
        [
            "data",
            "corrupt",
            "--dataset",
            "digits",
            "--root",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--workers",
            str(workers),
        ]
    )
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("forde:")]
    assert code == 2 and "Traceback" not in err
    assert (
        line.startswith(f"forde: no space left on the device writing {out}/") and "run the same command again" in line
    )
    assert not temporary_files(disk)
    recorded = json.loads((out / SOURCE_FILE).read_text())["generated"]
    on_disk = {
        f"{n}/{k}"
        for n in CORRUPTIONS
        for k in SEVERITIES
        if (out / f"{n}.npy").is_file() or (out / "parts" / f"{n}_s{k}.npy").is_file()
    }
    assert on_disk and on_disk <= set(recorded)  # every committed set is recorded as generated

    moved = tmp_path / "bigger-disk"  # space freed: the same command resumes
    shutil.copytree(out, moved)
    assert (
        main(
            [
                "data",
                "corrupt",
                "--dataset",
                "digits",
                "--root",
                str(tmp_path / "data"),
                "--out",
                str(moved),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert set(sources(moved).values()) == {"generated"}


def write_synthetic_dataset(root: Path, name: str, n_test: int) -> None:
    """An imported dataset of random 32x32 images: big enough that generating its sets takes several seconds."""
    rng = np.random.default_rng(0)

    def split(n):
        return Split(torch.from_numpy(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)), torch.arange(n) % 4)

    save_store(root / name, {"train": split(16), "test": split(n_test)}, ["a", "b", "c", "d"])


def group_ends(group: int, within: float) -> bool:
    """Whether every process of the group is gone (reaped, not only exited) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def ctrl_c_as_in_a_terminal() -> None:
    """A shell that runs the tests in the background makes its children ignore SIGINT; a terminal does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_the_worker_pool_at_once_and_leaves_only_resumable_state(tmp_path):
    write_synthetic_dataset(tmp_path / "data", "synth", 500)
    out = tmp_path / "synth-C"
    command = [
        sys.executable,
        "-m",
        "forde.cli",
        "data",
        "corrupt",
        "--dataset",
        "synth",
        "--root",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=ctrl_c_as_in_a_terminal,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("parts/*.npy")):  # the first set is committed
            assert process.poll() is None and time.monotonic() < deadline, "no set was generated"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: every process of the terminal's group gets it
        stopped, done_then = time.monotonic(), len(list(out.glob("parts/*.npy")))
        _, err = process.communicate(timeout=30)
        took = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130 and took < 15, (process.returncode, took, err[-2000:])
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("forde: interrupted")
    assert group_ends(process.pid, within=10), "a worker outlived the command"
    assert not temporary_files(out)
    recorded = set(json.loads((out / SOURCE_FILE).read_text())["generated"])
    committed = {f"{p.stem.rsplit('_s', 1)[0]}/{p.stem.rsplit('_s', 1)[1]}" for p in (out / "parts").glob("*.npy")}
    assert committed <= recorded and len(committed) <= done_then + 2  # at most the 2 workers' jobs were finishing

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(json.loads((out / SOURCE_FILE).read_text())["generated"]) == 95
    assert sorted(p.name for p in out.glob("*.npy")) == sorted([f"{n}.npy" for n in CORRUPTIONS] + ["labels.npy"])
