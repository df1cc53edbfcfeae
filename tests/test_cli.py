"""`forde train` and `forde eval` from the command line: what they refuse in one line (rc 2) before any work, and
the run directory's own files, which an evaluation never replaces."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

import forde.run_evaluation
from forde.atomic import replace_atomic
from forde.cli import main
from forde.run_dir import CHECKPOINT, CONFIG, METRICS

SMALL = [
    "run.progress=false",
    "run.wandb.mode=disabled",
    "ensemble_size=2",
    "model.hidden=[16]",
    "data.train_subset=64",
    "data.test_subset=64",
    "optim.batch_size=32",
    "optim.epochs=1",
    "eval.corruptions=[none]",
    "eval.grad_samples=0",
]


def train_args(tmp_path: Path, *extra: str, name: str = "run") -> list[str]:
    where = [f"run.out_dir={tmp_path}", f"run.name={name}", f"data.root={tmp_path / 'data'}"]
    return ["train", "quickstart", *where, *SMALL, *extra]


@pytest.fixture
def run(tmp_path) -> Path:
    assert main(train_args(tmp_path)) == 0
    return tmp_path / "run"


def one_line(capsys) -> str:
    """The command's own message: one line, no traceback (progress bars of its data preparation aside)."""
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("forde:")]
    assert len(said) == 1 and "Traceback" not in err, err
    return said[0]


def test_eval_never_replaces_the_runs_own_files(run, capsys):
    (run / "wandb").mkdir()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    for own in (CONFIG, CHECKPOINT, METRICS, "checkpoint.prev.pt", "wandb", "CONFIG.YAML", "previous-1"):
        assert main(["eval", str(run), "--out", own]) == 2
        assert f"--out '{own}' would replace the run's own {run / own}; name a new file" in one_line(capsys)
    assert main(["eval", str(run), "--out", "results-c.json "]) == 2
    assert "starts or ends with a space" in one_line(capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert main(["eval", str(run)]) == 0  # results.json, the final evaluation, is evaluated again


def test_eval_overrides_may_follow_the_options(run):
    assert main(["eval", str(run), "--out", "clean.json", "eval.corruptions=[none]", "eval.batch_size=7"]) == 0
    assert (run / "clean.json").exists()


def test_eval_of_a_read_only_run_is_one_line_before_evaluating(run, small_disk_factory, capsys, monkeypatch):
    disk = small_disk_factory(8 * 2**20)
    shutil.copytree(run, disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)

    def evaluated(*args, **kwargs):
        raise AssertionError("evaluated before checking that the results can be written")

    monkeypatch.setattr(forde.run_evaluation, "final_evaluation", evaluated)
    capsys.readouterr()
    assert main(["eval", str(disk / "run")]) == 2
    err = one_line(capsys)
    assert f"cannot write {disk / 'run' / 'results.json'} (Read-only file system); make {disk / 'run'} writable" in err


def test_the_atomic_writers_cleanup_never_hides_the_error_that_stopped_it(tmp_path, monkeypatch):
    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    def full_disk(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError) as err:
        replace_atomic(tmp_path / "results.json", full_disk)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "results.json")


def test_a_diverged_run_is_one_line_that_names_only_what_exists(tmp_path, capsys):
    assert main(train_args(tmp_path, "optim.lr=1e8", "data.train_subset=null", "optim.epochs=2")) == 2
    err = one_line(capsys)
    assert "in epoch 1" in err and CHECKPOINT not in err, err
    assert "diverged at optim.lr=1e+08 (no epoch finished, so no checkpoint was kept); lower optim.lr and run" in err
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_a_finished_run_asked_for_other_evaluation_settings_points_to_forde_eval(run, tmp_path, capsys):
    assert main([*train_args(tmp_path), "eval.ood=[uniform_noise]"]) == 2
    line = one_line(capsys)
    assert "holds a finished run, evaluated with other settings (eval.ood:" in line
    assert f"forde eval {run} OVERRIDES --out results-NAME.json" in line


def test_eval_of_an_unfinished_run_says_so(tmp_path, caplog):
    assert (
        main(
            [*train_args(tmp_path), "optim.epochs=3"],
        )
        == 0
    )
    import torch

    from forde.run_dir import CHECKPOINT as CKPT

    state = torch.load(tmp_path / "run" / CKPT, weights_only=False)
    state["epoch"] = 1
    torch.save(state, tmp_path / "run" / CKPT)
    assert main(["eval", str(tmp_path / "run"), "--out", "early.json"]) == 0
    assert "holds epoch 1 of 3: evaluating an unfinished run" in caplog.text


def test_a_report_of_a_folder_that_is_not_there_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "studies" / "quikstart")]) == 2
    assert "quikstart is not a folder" in one_line(capsys)
    assert not (tmp_path / "studies").exists()
