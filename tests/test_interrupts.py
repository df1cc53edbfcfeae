"""Signals are acted on where the run expects them: a SIGTERM landing inside a checkpoint write (or inside
OmegaConf, which once turned it into an AttributeError) lets that code finish and stops the trial at the
next step."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from optuna.trial import TrialState

import forde.train
from forde import interrupts
from sweep_support import FAST, epochs_trained, launch, load


class Stop(Exception):
    pass


@pytest.fixture
def raising_on_sigterm():
    """SIGTERM raises Stop (what a worker's handler does with Interrupted), counting its calls; the old
    handler afterwards."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise Stop(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    yield calls
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_is_acted_on_at_the_next_check_once_for_two(raising_on_sigterm):
    finished = []
    with interrupts.deferred(signal.SIGTERM):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same signal again, through the launcher
        finished.append("the work in progress")
        with pytest.raises(Stop):
            interrupts.check()
    assert finished == ["the work in progress"] and raising_on_sigterm == [signal.SIGTERM]
    with pytest.raises(Stop):  # outside, the handler acts at once again
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)


def test_a_stop_some_library_swallowed_is_acted_on_again_without_running_its_handler_twice(raising_on_sigterm):
    """What the handler raised is raised again; the handler itself runs once (submitit's requeues the job)."""
    with interrupts.deferred(signal.SIGTERM):
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            interrupts.check()
        except Stop:
            pass  # e.g. turned into an error of its own by the code it landed in
        with pytest.raises(Stop):
            interrupts.check()
        with pytest.raises(Stop):
            interrupts.check()
    assert raising_on_sigterm == [signal.SIGTERM]


def test_a_repeated_signal_after_the_stop_was_acted_on_is_ignored(raising_on_sigterm):
    """A launcher's own trial, already stopping: a late second signal must not cut short the trial's record."""
    recorded = []
    with interrupts.deferred(signal.SIGTERM, repeat_acts_now=True):
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Stop):
            interrupts.check()
        os.kill(os.getpid(), signal.SIGTERM)  # while the stopped trial is being recorded
        time.sleep(0.1)
        recorded.append("the record")
    assert recorded == ["the record"] and raising_on_sigterm == [signal.SIGTERM]


def test_leaving_forgets_a_signal_nobody_checked(raising_on_sigterm):
    with interrupts.deferred(signal.SIGTERM):
        os.kill(os.getpid(), signal.SIGTERM)
    interrupts.check()


def test_a_recorded_signal_ends_a_sleep(raising_on_sigterm):
    start = time.monotonic()
    with interrupts.deferred(signal.SIGTERM), pytest.raises(Stop):
        os.kill(os.getpid(), signal.SIGTERM)
        interrupts.sleep(30)
    assert time.monotonic() - start < 5


def test_a_repeated_signal_acts_at_once(raising_on_sigterm):
    """A launcher running its only worker in-process: the second Ctrl-C stops it even if no step comes."""
    with interrupts.deferred(signal.SIGTERM, repeat_acts_now=True), pytest.raises(Stop):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)


def test_sigterm_during_a_checkpoint_write_lets_it_finish_and_stops_the_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))
    real_save = forde.train.save_checkpoint

    def save_while_signalled(state, run_dir):
        os.kill(os.getpid(), signal.SIGTERM)
        real_save(state, run_dir)

    monkeypatch.setattr(forde.train, "save_checkpoint", save_while_signalled)
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", *FAST) == 128 + signal.SIGTERM
    (trial,) = load(tmp_path).get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["failure"] == "interrupted"
    run_dir = tmp_path / "studies" / "quickstart" / "runs" / "trial-0000"
    assert epochs_trained(run_dir) == [1]
    assert forde.train.load_checkpoint(run_dir)["epoch"] == 1


def test_a_second_ctrl_c_while_a_stopped_command_exits_prints_no_traceback(tmp_path):
    """A second Ctrl-C that lands in the interpreter's exit handlers (weakref finalizers, atexit) after the first
    stopped the launcher: the process ends with the one-line message and 130, not 'Exception ignored ... Traceback'."""
    script = tmp_path / "stopped.py"
    script.write_text(
        textwrap.dedent("""
        import argparse, atexit, os, signal, sys, time
        from forde.interrupts import Interrupted
        from forde.sweep.options import run_command

        def second_ctrl_c():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)

        def body(args):
            atexit.register(second_ctrl_c)
            raise Interrupted(signal.SIGINT)

        sys.exit(run_command(argparse.Namespace(worker=False), body))
    """)
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 130, out.stderr
    assert "Traceback" not in out.stderr and "interrupted by SIGINT" in out.stderr


def test_a_second_signal_after_the_launchers_own_handler_acted_cannot_kill_the_record():
    """The launcher's handler re-arms SIGTERM to kill the process; acted on inside a trial, a second SIGTERM must
    still be ignored until the stopped trial is recorded (it killed the launcher mid-record, leaving the trial
    running, to be taken for killed)."""
    previous = interrupts.install(worker=False)
    try:
        recorded = []
        with pytest.raises(interrupts.Interrupted):
            with interrupts.between_steps(worker=False):
                os.kill(os.getpid(), signal.SIGTERM)
                with pytest.raises(interrupts.Interrupted):
                    interrupts.check()
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
                os.kill(os.getpid(), signal.SIGTERM)  # with SIG_DFL this would end the test process
                time.sleep(0.1)
                recorded.append("the record")
                raise interrupts.Interrupted(signal.SIGTERM)
        assert recorded == ["the record"]
    finally:
        interrupts.restore(previous)
