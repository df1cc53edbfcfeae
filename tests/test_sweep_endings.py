"""Every way an attempt can end goes through one path that records it: a failed accelerator stops only its worker,
a configuration that cannot be built or a network that calls sys.exit fails its trial once, and nothing a trial
raises escapes the worker."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from forde.sweep.lifecycle import ENVIRONMENT, TRIAL, classify, is_accelerator_error
from forde.sweep.options import EXIT_ENVIRONMENT
from sweep_support import budget_used, launch, load

QUICK = ["--no-wandb", "optim.epochs=1", "model.hidden=[16]", "eval.corruptions=[none]"]


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))


def replace_training(monkeypatch, fake) -> None:
    monkeypatch.setattr("forde.train.train", fake)


ACCELERATOR_ERRORS = [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: uncorrectable ECC error encountered"),
    RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, ...)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
]


@pytest.mark.parametrize("err", ACCELERATOR_ERRORS, ids=["AcceleratorError", "ECC", "cuBLAS", "cuDNN"])
def test_a_failed_accelerator_is_the_environment(err):
    assert is_accelerator_error(err) and classify(err) == ENVIRONMENT


def test_out_of_memory_and_other_runtime_errors_stay_the_trial_s():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    for err in (oom, RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")):
        assert not is_accelerator_error(err) and classify(err) == TRIAL


def test_a_failed_accelerator_stops_its_worker_and_costs_no_budget(tmp_path, monkeypatch, caplog):
    """The GPU fails in the first trial: the worker records the trial as the environment's and stops at once (it
    would fail every later trial in seconds); the next launch, on a healthy device, finishes the study."""
    calls = []

    def broken_gpu(cfg, callbacks=()):
        calls.append(cfg.run.name)
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    replace_training(monkeypatch, broken_gpu)
    caplog.set_level(logging.INFO, logger="forde")
    assert launch(tmp_path, "--n-trials", "3", *QUICK) == EXIT_ENVIRONMENT
    assert calls == ["trial-0000"] and "its accelerator failed" in caplog.text
    trial, retry = load(tmp_path).get_trials()
    assert trial.user_attrs["failure"] == "environment" and "the accelerator failed" in trial.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING  # queued again, for a worker on a healthy device
    monkeypatch.undo()
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))
    assert launch(tmp_path, "--n-trials", "3", *QUICK) == 0
    trials = load(tmp_path).get_trials()
    assert budget_used(trials) == 3 and sum(t.state != TrialState.FAIL for t in trials) == 3


def test_a_network_that_calls_sys_exit_fails_its_trial_once(tmp_path, monkeypatch):
    """A user's model calling sys.exit is the trial's own failure (counted, not retried), not an interruption that
    would be retried for ever."""
    calls = []

    def exits(cfg, callbacks=()):
        calls.append(cfg.run.name)
        raise SystemExit(3)

    replace_training(monkeypatch, exits)
    assert launch(tmp_path, "--n-trials", "2", *QUICK) == 0
    trials = load(tmp_path).get_trials()
    assert calls == ["trial-0000", "trial-0001"] and budget_used(trials) == 2
    assert [t.user_attrs["failure"] for t in trials] == ["trial", "trial"]
    assert "called sys.exit(3)" in trials[0].user_attrs["fail_reason"]


def test_a_trial_whose_config_cannot_be_built_fails_once_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """The config of a sampled combination is refused as the trial starts (before, this escaped the worker)."""
    from forde.config import ConfigError
    from forde.sweep.study import Study

    real, refused = Study.trial_config, []

    def refuses_the_first(self, params, extra=None):
        if not refused and extra:  # a worker's call (the study's checks before it pass no run directory)
            refused.append(params)
            raise ConfigError("method.alpha = 2.0: must lie in [0, 1]")
        return real(self, params, extra)

    monkeypatch.setattr(Study, "trial_config", refuses_the_first)
    assert launch(tmp_path, "--n-trials", "2", *QUICK) == 0
    trials = load(tmp_path).get_trials()
    assert trials[0].user_attrs["failure"] == "trial" and "must lie in [0, 1]" in trials[0].user_attrs["fail_reason"]
    assert trials[1].state in (TrialState.COMPLETE, TrialState.PRUNED) and budget_used(trials) == 2


def test_a_keyboard_interrupt_inside_a_trial_is_recorded_before_it_is_raised_on(tmp_path, monkeypatch):
    def interrupted(cfg, callbacks=()):
        raise KeyboardInterrupt

    replace_training(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        launch(tmp_path, "--n-trials", "1", *QUICK)
    [trial] = load(tmp_path).get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["failure"] == "interrupted"


def test_training_is_the_sweep_s_own_function():
    """The tests above replace forde.train.train, which a worker must call (imported when it trains: a launcher that
    only starts workers never imports torch)."""
    import forde.train
    from forde.sweep.worker import TrialRunner

    assert TrialRunner(None, Path("."), use_wandb=False).train_fn is forde.train.train  # type: ignore[arg-type]
    check = "import sys, forde.sweep.launch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0, "the launcher imports torch"
