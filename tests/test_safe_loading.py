"""Files from elsewhere never run code: checkpoints, the PCA cache and CIFAR batches are read without executing
anything they name, and a file that would is refused in one line naming it."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from forde.cli import main
from forde.config import DataConfig, DataError
from forde.data.pca import cached_pca, compute_pca
from forde.data.registry import load_dataset
from forde.errors import RunDirError
from forde.run_dir import CHECKPOINT, PREVIOUS_CHECKPOINT, RESULTS, load_checkpoint
from forde.train import train
from test_datasets import write_cifar10
from test_train import Crash, tiny


class RunsACommand:
    """Unpickling this runs `touch marker`: what a hostile checkpoint or batch file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_args(tmp_path, name="run"):
    return [
        f"run.out_dir={tmp_path}",
        f"run.name={name}",
        "run.progress=false",
        "ensemble_size=3",
        "model.hidden=[32]",
        "optim.epochs=2",
        f"data.root={tmp_path / 'data'}",
        "eval.corruptions=[none]",
    ]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("forde:")]
    return line


def test_forde_eval_does_not_run_code_from_a_checkpoint(tmp_path, capsys):
    train(tiny(tmp_path, "optim.epochs=2"))
    run, marker = tmp_path / "run", tmp_path / "marker"
    torch.save({"epoch": 2, "ensemble": RunsACommand(marker)}, run / CHECKPOINT)
    assert main(["eval", str(run), "--out", "again.json"]) == 2
    line = one_error_line(capsys)
    assert not marker.exists() and not (run / "again.json").exists()
    assert f"{run / CHECKPOINT} was not loaded: it holds posix.system" in line and "Delete it" in line


def test_resuming_does_not_run_code_from_a_checkpoint(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, "optim.epochs=2"), callbacks=[Crash(at=1)])
    run, marker = tmp_path / "run", tmp_path / "marker"
    torch.save({"epoch": 1, "history": [RunsACommand(marker)]}, run / CHECKPOINT)
    assert main(["train", "quickstart", *tiny_args(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert not marker.exists() and not (run / RESULTS).exists()
    assert str(run / CHECKPOINT) in line and "could run code" in line
    assert capsys.readouterr().out == ""  # no numbers


def test_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    """What a run writes loads with weights_only=True, and the one before is kept the same way."""
    train(tiny(tmp_path, "optim.epochs=2"))
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        state = torch.load(tmp_path / "run" / name, weights_only=True)
        assert state["config"]["run"]["name"] == "run" and isinstance(state["history"][0]["epoch"], int)
    assert load_checkpoint(tmp_path / "run")["epoch"] == 2


def test_a_checkpoint_of_another_format_is_one_line_with_the_fix(tmp_path):
    """E.g. history values saved as NumPy scalars (a format forde never wrote): refused, not loaded unsafely."""
    train(tiny(tmp_path, "optim.epochs=2"))
    run = tmp_path / "run"
    state = torch.load(run / CHECKPOINT, weights_only=True)
    state["history"][0]["train/loss"] = np.float64(state["history"][0]["train/loss"])
    torch.save(state, run / CHECKPOINT)
    with pytest.raises(
        RunDirError,
        match=rf"{run / CHECKPOINT} was not loaded: it holds numpy.*Delete it unless you "
        rf"trust its origin; the run then resumes from {PREVIOUS_CHECKPOINT}",
    ):
        load_checkpoint(run)
    torch.save({"epoch": 1}, run / CHECKPOINT)
    with pytest.raises(RunDirError, match=r"is not a checkpoint of `forde train` \(missing or malformed: ensemble"):
        load_checkpoint(run)


def test_results_json_of_another_kind_is_evaluated_again(tmp_path, caplog):
    first = train(tiny(tmp_path, "optim.epochs=2"))
    (tmp_path / "run" / RESULTS).write_text(json.dumps({"summary": {"test/accuracy": "high"}}))
    again = train(tiny(tmp_path, "optim.epochs=2"))
    assert "holds no results of `forde train`" in caplog.text
    assert again["summary"] == first["summary"]


def test_a_pca_cache_that_would_run_code_is_computed_again(tmp_path, caplog):
    inputs = torch.randn(50, 6, dtype=torch.float64)
    mean, std = (0.0,) * 6, (1.0,) * 6
    cached_pca(inputs, mean, std, tmp_path, "x")
    [path] = tmp_path.glob("pca-x-*.pt")
    marker = tmp_path / "marker"
    torch.save({"eigenvalues": RunsACommand(marker)}, path)
    pca = cached_pca(inputs, mean, std, tmp_path, "x")
    assert not marker.exists() and "is unusable" in caplog.text and "posix.system" in caplog.text
    assert torch.equal(pca.eigenvalues, compute_pca(inputs, mean, std).eigenvalues)
    assert torch.load(path, weights_only=True)["eigenvalues"].shape == (6,)  # replaced


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    marker = tmp_path / "marker"
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((3, 3072), np.uint8), "labels": RunsACommand(marker)}, f, protocol=2)
    with pytest.raises(DataError, match=rf"{batch} was not read: it holds posix.system"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not marker.exists()
