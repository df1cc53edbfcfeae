"""Sweeps with real Optuna, real SQLite and PostgreSQL, and real wandb in offline mode."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from forde.config import ConfigError
from forde.train import CHECKPOINT

from conftest import CUDA
from forde.sweep.launch import main
from forde.sweep.study import load_study

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "sweeps" / "studies"
WANDB = str(Path(sys.executable).with_name("wandb"))  # the wandb CLI of this environment, activated or not
FAST = ["optim.epochs=3", "model.hidden=[32]", "eval.corruptions=[none]"]
SOME_CORRUPTIONS = ["optim.epochs=3", "model.hidden=[32]", "eval.corruptions=[gaussian_noise,contrast]",
                    "eval.severities=[1,5]", "eval.grad_samples=100"]


def launch(tmp_path, *args, study="quickstart"):
    return main(["--study", study, "--out", str(tmp_path / "studies"), *args], studies_dir=STUDIES)


def launch_cmd(tmp_path, *args, study="quickstart"):
    return [sys.executable, str(REPO / "sweeps" / "launch.py"), "--study", study, "--out", str(tmp_path / "studies"), *args]


def env_for(tmp_path):
    return {**os.environ, "FORDE_DATA": str(tmp_path / "data"), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def load(tmp_path, name="quickstart", storage=None):
    url = storage or f"sqlite:///{tmp_path / 'studies' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url)


def epochs_trained(run_dir: Path) -> list[int]:
    return [json.loads(l)["epoch"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")


@CUDA
def test_quickstart_study_on_gpu_0(tmp_path):
    """`--gpus 0`: one worker process on GPU 0 runs two trials; their weights were trained on the GPU (W&B is tested
    on the CPU; the GPU machine need not have it)."""
    assert launch(tmp_path, "--gpus", "0", "--n-trials", "2", "--no-wandb", *FAST) == 0
    trials = load(tmp_path).get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        state = torch.load(Path(t.user_attrs["run_dir"]) / CHECKPOINT, weights_only=False)
        assert all(v.is_cuda for v in state["ensemble"].values())
        assert epochs_trained(Path(t.user_attrs["run_dir"])) == [1, 2, 3]


def test_quickstart_study_runs_three_trials_end_to_end(tmp_path):
    assert launch(tmp_path, "--n-trials", "3", *SOME_CORRUPTIONS) == 0
    opt = load(tmp_path)
    trials = opt.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        results = json.loads((run_dir / "results.json").read_text())
        assert t.user_attrs["summary"] == results["summary"]
        assert t.value == results["summary"]["val/nll"]
        assert epochs_trained(run_dir) == [1, 2, 3]
        [wandb_dir] = run_dir.glob("wandb/offline-run-*")
        record = json.loads(subprocess.run([WANDB, "leet", "inspect", "--summary", "--json", str(wandb_dir)],
                                           capture_output=True, text=True, check=True).stdout)
        assert record["state"] == "finished" and record["name"] == run_dir.name
        assert record["summary"]["test/accuracy"] == pytest.approx(results["summary"]["test/accuracy"])
        assert record["config"]["method"]["alpha"] == pytest.approx(t.params["method.alpha"])
        assert record["config"]["run_dir"] == str(run_dir)
        assert record["summary"]["corrupted/accuracy"] == pytest.approx(results["summary"]["corrupted/accuracy"])
        assert record["summary"]["corrupted/per_set"]["nrows"] == 4  # 2 corruptions x 2 severities
        assert len(results["corrupted"]["per_set"]) == 4
    best = (tmp_path / "studies" / "quickstart" / "best.md").read_text()
    assert f"| {opt.best_trial.number} |" in best
    # re-running the finished study starts nothing new
    assert launch(tmp_path, "--n-trials", "3", *SOME_CORRUPTIONS) == 0
    assert len(load(tmp_path).get_trials()) == 3


def test_killed_worker_is_resumed_and_every_trial_accounted_for(tmp_path):
    args = ["--n-trials", "2", "--no-wandb", "optim.epochs=5", "model.hidden=[32]"]
    proc = subprocess.Popen(launch_cmd(tmp_path, *args), env=env_for(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "studies" / "quickstart" / "runs" / "trial-0000" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpt.exists() and len(epochs_trained(ckpt.parent)) >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    import torch
    killed_at = torch.load(ckpt, weights_only=False)["epoch"]
    assert 2 <= killed_at < 5
    assert load(tmp_path).get_trials()[0].state == TrialState.RUNNING

    out = subprocess.run(launch_cmd(tmp_path, *args), env=env_for(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"from epoch {killed_at}" in out.stderr  # resumed, not restarted
    trials = load(tmp_path).get_trials()
    states = {t.number: t.state for t in trials}
    assert states[0] == TrialState.FAIL  # the killed attempt, retried as a later trial
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    [retry] = [t for t in done if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert Path(retry.user_attrs["run_dir"]).name == "trial-0000"  # the retry trained on in the killed run's directory
    assert len({t.user_attrs["run_dir"] for t in done}) == 2
    for t in done:
        assert epochs_trained(Path(t.user_attrs["run_dir"])) == list(range(1, 6))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study(tmp_path, backend):
    if backend == "postgresql":
        url = os.environ.get("FORDE_TEST_POSTGRES_URL")
        if not url:
            if os.environ.get("FORDE_REQUIRE_POSTGRES"):
                pytest.fail("FORDE_TEST_POSTGRES_URL is not set but PostgreSQL is required")
            pytest.skip("no PostgreSQL server (bash .ci/run starts one)")
        name = f"quickstart_pg_{os.getpid()}_{int(time.time())}"
        study_file = tmp_path / f"{name}.yaml"
        study_file.write_text((STUDIES / "quickstart.yaml").read_text() + f"\nname: {name}\n")
        extra, study = ["--storage", url], str(study_file)
    else:
        url, name, extra, study = None, "quickstart", [], "quickstart"
    out = subprocess.run(launch_cmd(tmp_path, "--workers", "2", "--n-trials", "4", "--no-wandb", *FAST, *extra,
                                    study=study), env=env_for(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = load(tmp_path, name, url).get_trials()
    assert len(trials) == 4  # no trial lost, none extra
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(run_dirs)) == 4  # none run twice
    for d in run_dirs:
        assert epochs_trained(Path(d))[0] == 1 and len(set(epochs_trained(Path(d)))) == len(epochs_trained(Path(d)))
    finished = {line.split("worker ")[1].split(":")[0] for line in out.stderr.splitlines() if "no trials left" in line}
    assert len(finished) == 2  # two worker processes served the study to its end


def test_a_trial_with_a_config_error_fails_once_with_its_reason(tmp_path):
    from forde.sweep.worker import open_study, storage_for

    path = tmp_path / "batch.yaml"
    path.write_text((STUDIES / "quickstart.yaml").read_text() + "  optim.batch_size: {choices: [64, 4096]}\nname: batch\n")
    study = load_study(path, FAST)
    study_dir = tmp_path / "studies" / "batch"
    study_dir.mkdir(parents=True)
    opt = open_study(study, storage_for(f"sqlite:///{study_dir / 'study.db'}"))
    opt.enqueue_trial({"optim.batch_size": 4096, "ensemble_size": 3})  # larger than the training set
    opt.enqueue_trial({"optim.batch_size": 64, "ensemble_size": 3})
    assert launch(tmp_path, "--n-trials", "2", "--no-wandb", *FAST, study=str(path)) == 0
    trials = load(tmp_path, "batch").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "optim.batch_size = 4096" in trials[0].user_attrs["fail_reason"]


def write_study(tmp_path, body: str) -> Path:
    path = tmp_path / "bad.yaml"
    head = "base: quickstart\n" + ("" if "n_trials" in body else "n_trials: 2\n")
    if "objectives" not in body:
        head += "objectives: [{metric: test/nll, direction: minimize}]\n"
    path.write_text(head + body)
    return path


@pytest.mark.parametrize("body,message", [
    ("search_space:\n  method.alpah: {low: 0.0, high: 1.0}\n", r"method.alpah.*did you mean 'method.alpha'"),
    ("search_space:\n  method.alpha: {low: 0.5, high: 0.5}\n", r"empty range \[0.5, 0.5\]"),
    ("search_space:\n  ensemble_size: {choices: []}\n", r"choices must be a non-empty list"),
    ("search_space:\n  optim.lr: {low: 0.0, high: 0.1, log: true}\n", r"log range needs low > 0"),
    ("search_space:\n  method.alpha: {low: 0.0, high: 2.0}\n", r"method.alpha"),
    ("config: {data: {name: imagenet}}\n", r"imagenet"),
    ("n_trials: 0\n", r"n_trials"),
    ("objectives: [{metric: val/nll, direction: minimize}]\n", r"val/nll.*val_fraction"),
    ("sampler: {name: bayes}\n", r"sampler.name"),
])
def test_bad_study_files_fail_before_training(tmp_path, capsys, body, message):
    path = write_study(tmp_path, body)
    code = launch(tmp_path, study=str(path))
    assert code == 2
    import re
    assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "studies" / "bad" / "runs").exists()


def test_missing_dataset_fails_before_training(tmp_path, capsys):
    path = write_study(tmp_path, "config: {data: {name: cifar10, root: %s}, model: {name: resnet18}}\n" % (tmp_path / "empty"))
    assert launch(tmp_path, study=str(path)) == 2
    assert "cifar10" in capsys.readouterr().err
    assert not (tmp_path / "studies" / "bad" / "runs").exists()


def test_conditional_parameters_and_grid_expansion(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("""
base: quickstart
objectives: [{metric: test/accuracy, direction: maximize}]
sampler: {name: grid}
search_space:
  method.name: {choices: [forde, de]}
  method.alpha: {low: 0.0, high: 1.0, when: {method.name: forde}}
  seed: {choices: [0, 1]}
grid:
  - {method.name: forde, method.alpha: [0.0, 1.0], seed: [0, 1]}
  - {method.name: de, seed: [0, 1]}
""")
    study = load_study(path)
    assert study.n_trials == 6
    assert {"method.name": "de", "seed": 1} in study.grid
    with pytest.raises(ConfigError, match="outside its search-space range"):
        path.write_text(path.read_text().replace("[0.0, 1.0], seed", "[0.0, 1.5], seed"))
        load_study(path)


def test_grid_study_runs_each_point_once(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("""
base: quickstart
objectives: [{metric: test/accuracy, direction: maximize}]
sampler: {name: grid}
search_space:
  method.name: {choices: [forde, de]}
  method.alpha: {choices: [0.0, 1.0], when: {method.name: forde}}
grid:
  - {method.name: forde, method.alpha: [0.0, 1.0]}
  - {method.name: de}
""")
    assert launch(tmp_path, "--no-wandb", "optim.epochs=1", "model.hidden=[16]", "eval.corruptions=[none]",
                  study=str(path)) == 0
    trials = load(tmp_path, "grid").get_trials()
    assert sorted((t.params["method.name"], t.params.get("method.alpha")) for t in trials) == [
        ("de", None), ("forde", 0.0), ("forde", 1.0)]
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_shipped_studies_are_valid():
    for path in sorted(STUDIES.glob("*.yaml")):
        study = load_study(path)
        assert study.n_trials >= 1, path
