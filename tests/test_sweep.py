"""Study files, sampling and the trial budget, with real Optuna, real SQLite and real wandb in offline mode.
Worker processes, kills and signals are in test_sweep_processes.py; failures and pre-flight checks in
test_sweep_failures.py."""

import json
import os
import re
import signal
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState

import forde.train
from conftest import CUDA
from forde.config import ConfigError
from forde.run_dir import CHECKPOINT
from forde.sweep.storage import SweepStorage
from forde.sweep.study import check_study, read_study
from forde.sweep.worker import Sweep, open_study
from sweep_support import (
    FAST,
    STUDIES,
    budget_used,
    configurations,
    epochs_trained,
    grid_study,
    launch,
    load,
    wandb_record,
)

SOME_CORRUPTIONS = [
    "optim.epochs=3",
    "model.hidden=[32]",
    "eval.corruptions=[gaussian_noise,contrast]",
    "eval.severities=[1,5]",
    "eval.grad_samples=100",
]


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
    assert len(set(configurations(trials))) == 3
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        results = json.loads((run_dir / "results.json").read_text())
        assert t.user_attrs["summary"] == results["summary"]
        assert t.value == results["summary"]["val/nll"]
        assert epochs_trained(run_dir) == [1, 2, 3]
        [wandb_dir] = run_dir.glob("wandb/offline-run-*")
        record = wandb_record(wandb_dir)
        assert record["state"] == "finished" and record["name"] == run_dir.name
        assert record["summary"]["outcome"] == "finished"
        assert record["summary"]["test/accuracy"] == pytest.approx(results["summary"]["test/accuracy"])
        assert record["config"]["method"]["alpha"] == pytest.approx(t.params["method.alpha"])
        assert record["config"]["run_dir"] == str(run_dir)
        assert record["summary"]["corrupted/accuracy"] == pytest.approx(results["summary"]["corrupted/accuracy"])
        assert record["summary"]["corrupted/per_set"]["nrows"] == 4  # 2 corruptions x 2 severities
        assert len(results["corrupted"]["per_set"]) == 4
        for key in ("ood/gaussian_noise/auroc_mi", "test/ts/nll", "temperature", "test/aurc"):  # the study holds out
            assert record["summary"][key] == pytest.approx(results["summary"][key])  # a validation split
        assert record["summary"]["ood/table"]["nrows"] == 10  # 2 noise sets x 5 scores
    best = (tmp_path / "studies" / "quickstart" / "best.md").read_text()
    assert f"| {opt.best_trial.number} |" in best
    assert opt.user_attrs["settings"]["optim.epochs"] == 3 and opt.metric_names == ["val/nll"]
    # re-running the finished study starts nothing new
    assert launch(tmp_path, "--n-trials", "3", *SOME_CORRUPTIONS) == 0
    assert len(load(tmp_path).get_trials()) == 3


def synthetic_study(tmp_path, name: str, body: str = "", workers: int = 1) -> tuple:
    """A study in a real SQLite file, opened once per simulated worker (the sampling, without training)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(body or (STUDIES / "quickstart.yaml").read_text())
    study = read_study(path)
    storage = SweepStorage(f"sqlite:///{tmp_path / name}.db")
    return study, storage, [Sweep(study, storage) for _ in range(workers)]


def take(sweep: Sweep):
    """What a worker does between two trainings: take a trial under the budget lock, then report a value."""
    picked = sweep.take()
    if picked is None:
        return None
    trial, params = picked
    sweep.opt.tell(trial, sum(float(v) for v in params.values() if not isinstance(v, str)))
    return params


def test_one_worker_with_a_seed_draws_the_same_configurations_every_time(tmp_path):
    runs = []
    for name in ("first", "second"):
        study, storage, [sweep] = synthetic_study(tmp_path, name)
        runs.append([take(sweep) for _ in range(6)])
    assert runs[0] == runs[1]  # TPE's start-up draws and its model-based ones
    assert len({tuple(sorted(p.items())) for p in runs[0]}) == 6


def test_workers_and_relaunches_never_draw_the_same_configuration(tmp_path):
    study, storage, (a, b) = synthetic_study(tmp_path, "shared", workers=2)  # two workers, same seed
    drawn = [take(a), take(b), take(b), take(a)]
    relaunched = Sweep(study, storage)  # a later launch of the same study
    drawn += [take(relaunched) for _ in range(2)]
    assert None not in drawn and len({tuple(sorted(p.items())) for p in drawn}) == 6
    assert take(relaunched) is None  # n_trials = 6 reached


def test_a_configuration_drawn_again_is_discarded_and_an_exhausted_space_stops(tmp_path, caplog):
    body = """base: quickstart
config: {data: {val_fraction: 0.2}}
n_trials: 5
objectives: [{metric: val/nll, direction: minimize}]
sampler: {name: random, seed: 0}
search_space:
  ensemble_size: {choices: [3, 4]}
  seed: {choices: [0, 1]}
"""
    study, storage, [sweep] = synthetic_study(tmp_path, "small", body)
    drawn = []
    while (params := take(sweep)) is not None:
        drawn.append(params)
    assert sorted(tuple(sorted(p.items())) for p in drawn) == [
        (("ensemble_size", m), ("seed", s)) for m in (3, 4) for s in (0, 1)
    ]
    trials = sweep.opt.get_trials()
    duplicates = [t for t in trials if t.user_attrs.get("failure") == "duplicate"]
    assert duplicates and all(
        t.state == TrialState.FAIL and "discarded" in t.user_attrs["fail_reason"] for t in duplicates
    )
    assert budget_used(trials) == 4  # duplicates use no budget
    assert "search space looks exhausted" in caplog.text


def test_a_config_error_or_a_divergence_fails_once_with_its_reason(tmp_path):
    path = tmp_path / "batch.yaml"
    path.write_text(
        (STUDIES / "quickstart.yaml").read_text() + "  optim.batch_size: {choices: [64, 4096]}\nname: batch\n"
    )
    study = read_study(path, FAST)
    study_dir = tmp_path / "studies" / "batch"
    study_dir.mkdir(parents=True)
    opt = open_study(study, SweepStorage(f"sqlite:///{study_dir / 'study.db'}"))
    opt.enqueue_trial({"optim.batch_size": 4096, "ensemble_size": 3})  # larger than the training set
    opt.enqueue_trial({"optim.batch_size": 64, "ensemble_size": 3, "optim.lr": 1e12})  # diverges
    opt.enqueue_trial({"optim.batch_size": 64, "ensemble_size": 3})
    assert launch(tmp_path, "--n-trials", "3", *FAST, study=str(path)) == 0
    trials = load(tmp_path, "batch").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]  # none retried
    assert [t.user_attrs["failure"] for t in trials[:2]] == ["trial", "trial"] and budget_used(trials) == 3
    assert "optim.batch_size = 4096" in trials[0].user_attrs["fail_reason"]
    assert "NonFiniteLossError: training loss became" in trials[1].user_attrs["fail_reason"]
    [wandb_dir] = Path(trials[0].user_attrs["run_dir"]).glob("wandb/offline-run-*")
    record = wandb_record(wandb_dir)  # a failed trial is marked as such in W&B
    assert record["state"] == "failed" and "failed" in record["tags"]
    assert record["summary"]["outcome"] == "failed" and "4096" in record["summary"]["fail_reason"]


def test_a_pruned_trial_is_marked_in_wandb(tmp_path):
    path = tmp_path / "prune.yaml"
    path.write_text("""name: prune
base: quickstart
config: {data: {val_fraction: 0.2}}
n_trials: 2
objectives: [{metric: val/nll, direction: minimize}]
sampler: {name: random, seed: 0}
pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
search_space:
  optim.lr: {low: 0.00001, high: 0.2, log: true}
""")
    study = read_study(path, FAST)
    study_dir = tmp_path / "studies" / "prune"
    study_dir.mkdir(parents=True)
    opt = open_study(study, SweepStorage(f"sqlite:///{study_dir / 'study.db'}"))
    opt.enqueue_trial({"optim.lr": 0.1})
    opt.enqueue_trial({"optim.lr": 0.00001})  # far worse after one epoch: the median pruner stops it
    assert launch(tmp_path, *FAST, study=str(path)) == 0
    trials = load(tmp_path, "prune").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    [wandb_dir] = Path(trials[1].user_attrs["run_dir"]).glob("wandb/offline-run-*")
    record = wandb_record(wandb_dir)
    assert "pruned" in record["tags"] and record["summary"]["outcome"] == "pruned"


def write_study(tmp_path, body: str) -> Path:
    path = tmp_path / "bad.yaml"
    head = "base: quickstart\n" + ("" if "n_trials" in body else "n_trials: 2\n")
    if "objectives" not in body:
        head += "objectives: [{metric: test/nll, direction: minimize}]\n"
    path.write_text(head + body)
    return path


@pytest.mark.parametrize(
    "body,message",
    [
        ("search_space:\n  method.alpah: {low: 0.0, high: 1.0}\n", r"method.alpah.*did you mean 'method.alpha'"),
        ("search_space:\n  method.alpha: {low: 0.5, high: 0.5}\n", r"empty range \[0.5, 0.5\]"),
        ("search_space:\n  ensemble_size: {choices: []}\n", r"choices must be a non-empty list"),
        ("search_space:\n  optim.lr: {low: 0.0, high: 0.1, log: true}\n", r"log range needs low > 0"),
        ("search_space:\n  method.alpha: {low: 0.0, high: 2.0}\n", r"method.alpha"),
        ("config: {data: {name: imagenet}}\n", r"imagenet"),
        ("n_trials: 0\n", r"n_trials"),
        ("objectives: [{metric: val/nll, direction: minimize}]\n", r"val/nll.*val_fraction"),
        ("sampler: {name: bayes}\n", r"sampler.name"),
        ("sampler: {name: tpe, bogus: 1}\n", r"sampler: TPESampler has no option 'bogus'; its options: .*n_startup"),
        ("sampler: {name: tpe, seed: zero}\n", r"sampler.seed = 'zero': expected an integer"),
        ("pruner: {name: median, n_startup_trials: two}\n", r"pruner.n_startup_trials = 'two': expected int$"),
        ("pruner: {name: none, patience: 3}\n", r"pruner: NopPruner has no option 'patience'; it takes none"),
        ("pruner: {name: median, n_warmup_steps: -1}\n", r"pruner: MedianPruner refuses .*n_warmup_steps"),
        ("sampler: {name: tpe, gamma: 0.5}\n", r"sampler.gamma: TPESampler takes a Python function there"),
        (
            "objectives: [{metric: ood/svhn/auroc_mi, direction: maximize}]\n",
            r"metric 'ood/svhn/auroc_mi' needs the OOD set 'svhn' in eval.ood",
        ),
        (
            "objectives: [{metric: ood/uniform_noise/auroc_magic, direction: maximize}]\n",
            r"unknown metric 'auroc_magic'; known: auroc_msp, ",
        ),
        ("objectives: [{metric: test/ts/nll, direction: minimize}]\n", r"needs temperature scaling on a validation"),
        ("sampler: tpe\n", r"sampler: expected a mapping such as \{name: tpe\}, got 'tpe'"),
        ("pruner: [median]\n", r"pruner: expected a mapping such as \{name: median\}, got \['median'\]"),
        ("search_space:\n  model.hidden: {choices: ['[8]', [8]]}\n", r"the choice '\[8\]' is stored as the list"),
    ],
)
def test_bad_study_files_fail_before_training(tmp_path, capsys, body, message):
    path = write_study(tmp_path, body)
    code = launch(tmp_path, study=str(path))
    assert code == 2
    import re

    assert re.search(message, capsys.readouterr().err.strip()), message
    assert not (tmp_path / "studies" / "bad").exists()  # no storage, no folder


PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


@pytest.mark.parametrize(
    "study,message",
    [
        (
            "base: passwd\n",
            r"^launch.py: study 'bad': base: \S*passwd is not a config file: its YAML is one value, not a mapping",
        ),
        ("base: quickstart\nbudget: 3\n", r"unknown top-level key\(s\) \['budget'\]; known: \[.*'name'"),
        (
            "base: quickstart\nsearch_space:\n\tseed: {choices: [0, 1]}\n",
            r"YAML syntax error at line 3, column 1: .*cannot start any token \(a tab; YAML indents with spaces only\)",
        ),
    ],
)
def test_study_file_errors_say_what_is_wrong_in_one_line(tmp_path, capsys, study, message):
    (tmp_path / "passwd").write_text(PASSWD)
    path = tmp_path / "bad.yaml"
    path.write_text(study + "objectives: [{metric: test/nll, direction: minimize}]\n")
    assert launch(tmp_path, study=str(path)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1 and "root:x" not in err, err


def test_a_bad_override_is_blamed_on_the_config_not_on_a_searched_key(tmp_path, capsys):
    assert launch(tmp_path, "optim.epochs=0") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "launch.py: study 'quickstart': config: optim.epochs = 0: must be at least 1; set a positive number, "
        "e.g. optim.epochs=300 (the paper's)"
    )


def test_missing_dataset_fails_before_training(tmp_path, capsys):
    path = write_study(
        tmp_path, "config: {data: {name: cifar10, root: %s}, model: {name: resnet18}}\n" % (tmp_path / "empty")
    )
    assert launch(tmp_path, study=str(path)) == 2
    assert "cifar10" in capsys.readouterr().err
    assert not (tmp_path / "studies" / "bad" / "runs").exists()


def test_conditional_parameters_and_grid_expansion(tmp_path):
    path = grid_study(
        tmp_path,
        """
search_space:
  method.name: {choices: [forde, de]}
  method.alpha: {low: 0.0, high: 1.0, when: {method.name: forde}}
  seed: {choices: [0, 1]}
grid:
  - {method.name: forde, method.alpha: [0.0, 1.0], seed: [0, 1]}
  - {method.name: de, seed: [0, 1]}
""",
    )
    study = read_study(path)
    assert study.n_trials == 6
    assert {"method.name": "de", "seed": 1} in study.grid
    with pytest.raises(ConfigError, match="outside its search-space range"):
        path.write_text(path.read_text().replace("[0.0, 1.0], seed", "[0.0, 1.5], seed"))
        read_study(path)


def test_settings_a_method_brings_are_checked_together(tmp_path):
    """Fixed values under one condition (SWAG's learning-rate schedule) are checked as a trial gets them: with
    each other, not each against the defaults; and a bad pair under its condition still fails."""
    body = """
search_space:
  method.name: {choices: [de, swag]}
  optim.decay_start: {value: 0.27, when: {method.name: swag}}
  optim.decay_end: {value: 0.48, when: {method.name: swag}}
grid:
  - {method.name: [de, swag]}
"""
    path = grid_study(tmp_path, body)
    check_study(read_study(path), [], trust_code=False)
    path.write_text(path.read_text().replace("value: 0.27", "value: 0.6"))
    with pytest.raises(ConfigError, match="decay_start"):
        check_study(read_study(path), [], trust_code=False)


def test_grid_study_runs_each_point_once(tmp_path):
    path = grid_study(
        tmp_path,
        """
search_space:
  method.name: {choices: [forde, de]}
  method.alpha: {choices: [0.0, 1.0], when: {method.name: forde}}
grid:
  - {method.name: forde, method.alpha: [0.0, 1.0]}
  - {method.name: de}
""",
    )
    assert (
        launch(
            tmp_path, "--no-wandb", "optim.epochs=1", "model.hidden=[16]", "eval.corruptions=[none]", study=str(path)
        )
        == 0
    )
    trials = load(tmp_path, "grid").get_trials()
    assert sorted((t.params["method.name"], t.params.get("method.alpha")) for t in trials) == [
        ("de", None),
        ("forde", 0.0),
        ("forde", 1.0),
    ]
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_a_stopped_grid_trial_resumes_before_the_points_nobody_started(tmp_path, monkeypatch):
    """Grid points are queued one at a time, so the retry of a stopped trial (a partly trained run) is taken
    before the points nobody started, not after all of them."""
    path = grid_study(
        tmp_path,
        """
search_space:
  seed: {choices: [0, 1, 2]}
grid:
  - {seed: [0, 1, 2]}
""",
    )
    real_save, stopped = forde.train.save_checkpoint, []

    def stop_after_the_first_save(state, run_dir):
        real_save(state, run_dir)
        if not stopped:
            stopped.append(run_dir)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(forde.train, "save_checkpoint", stop_after_the_first_save)
    args = ["--no-wandb", "optim.epochs=2", "model.hidden=[16]", "eval.corruptions=[none]"]
    assert launch(tmp_path, *args, study=str(path)) == 128 + signal.SIGTERM
    assert launch(tmp_path, *args, study=str(path)) == 0
    done = sorted(
        (t for t in load(tmp_path, "grid").get_trials() if t.state == TrialState.COMPLETE),
        key=lambda t: t.datetime_start,
    )
    assert [(Path(t.user_attrs["run_dir"]).name, t.params["seed"]) for t in done] == [
        ("trial-0000", 0),
        ("trial-0002", 1),
        ("trial-0003", 2),
    ]
    assert epochs_trained(stopped[0]) == [1, 2]


LIST_CHOICES = "  model.hidden: {choices: [[16, 16], [8]]}\n"


def test_list_valued_keys_are_searched_and_run(tmp_path):
    """A list-valued key (model.hidden) sampled by the quickstart study: Optuna stores each choice as its flow-style
    YAML (its categorical distributions take no lists), and each trial trains with the list it stands for."""
    path = tmp_path / "lists.yaml"
    quickstart = (STUDIES / "quickstart.yaml").read_text()
    path.write_text(quickstart.replace("search_space:\n", "search_space:\n" + LIST_CHOICES) + "name: lists\n")
    args = ["--n-trials", "2", "--no-wandb", "optim.epochs=1", "eval.corruptions=[none]"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Optuna warns of choices it cannot store
        assert launch(tmp_path, *args, study=str(path)) == 0
    trials = load(tmp_path, "lists").get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials) and len(trials) == 2
    for t in trials:
        assert t.params["model.hidden"] in ("[16, 16]", "[8]")
        trained = OmegaConf.load(Path(t.user_attrs["run_dir"]) / "config.yaml").model.hidden
        assert str(list(trained)).replace("'", "") == t.params["model.hidden"]


def test_grid_points_of_list_values_run_once_each(tmp_path):
    path = grid_study(tmp_path, "search_space:\n" + LIST_CHOICES + "grid:\n  - {model.hidden: [[16, 16], [8]]}\n")
    assert launch(tmp_path, "--no-wandb", "optim.epochs=1", "eval.corruptions=[none]", study=str(path)) == 0
    trials = load(tmp_path, "grid").get_trials()
    assert sorted(t.params["model.hidden"] for t in trials) == ["[16, 16]", "[8]"]
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_status_shows_a_study_and_changes_nothing(tmp_path, capsys):
    assert launch(tmp_path, "--status") == 2  # no study yet: one line, nothing created
    err = capsys.readouterr().err.strip()
    assert err.startswith("launch.py: no study 'quickstart' in sqlite:///") and len(err.splitlines()) == 1
    assert not (tmp_path / "studies").exists() and not (tmp_path / "data").exists()

    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", *FAST) == 0
    capsys.readouterr()
    study_dir = tmp_path / "studies" / "quickstart"
    before = {p: p.read_bytes() for p in study_dir.rglob("*") if p.is_file()}
    assert launch(tmp_path, "--status", "--workers", "2", "--n-trials", "1", *FAST) == 0
    out = capsys.readouterr().out
    assert out.startswith("study 'quickstart': 1 complete; budget 1 of 1 configurations used\n")
    assert "Best trial of study 'quickstart' (val/nll minimize)" in out and "| 0 |" in out
    assert {p: p.read_bytes() for p in study_dir.rglob("*") if p.is_file()} == before


NOISY_NETWORK = """
from pathlib import Path
Path(__file__).with_name("imported").touch()
from torch import nn

def net(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
"""


def test_status_builds_and_imports_nothing(tmp_path, capsys, monkeypatch):
    """`--status` reads the storage: the network a study names as code is neither imported nor built, even with
    --trust-code."""
    (tmp_path / "noisy_net.py").write_text(NOISY_NETWORK)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_study(tmp_path, "config: {model: {name: 'noisy_net:net'}}\n")
    assert launch(tmp_path, "--status", "--trust-code", study=str(path)) == 2  # no such study yet
    assert "no study 'bad'" in capsys.readouterr().err and not (tmp_path / "imported").exists()
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", "--trust-code", *FAST, study=str(path)) == 0
    (tmp_path / "imported").unlink()
    capsys.readouterr()
    assert launch(tmp_path, "--status", "--trust-code", study=str(path)) == 0
    assert capsys.readouterr().out.startswith("study 'bad': 1 complete") and not (tmp_path / "imported").exists()


def test_a_study_may_optimise_ood_detection_and_calibrated_metrics(tmp_path):
    path = write_study(
        tmp_path,
        "config: {data: {val_fraction: 0.2}}\nobjectives: [{metric: ood/gaussian_noise/auroc_mi, direction: maximize},"
        " {metric: test/ts/ece, direction: minimize}]\n",
    )
    study = read_study(path)
    assert [o.metric for o in study.objectives] == ["ood/gaussian_noise/auroc_mi", "test/ts/ece"]


def test_shipped_studies_are_valid():
    for path in sorted(STUDIES.glob("*.yaml")):
        study = read_study(path)
        assert study.n_trials >= 1, path
