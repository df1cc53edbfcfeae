"""Signals, in one module: what SIGTERM, Ctrl-C and Slurm's USR2 do to a sweep's launcher and its workers, and
where a run acts on them.

A Python signal handler runs between two bytecodes of whatever the main thread is doing, and an exception it
raises there can be swallowed or replaced by library code caught half-way: OmegaConf, interrupted while it
built a checkpoint's config, raised an AttributeError of its own, and a stopped trial was taken for a failure.
So while a trial runs (`deferred`), a signal is only recorded; the training loop, the evaluation loop and the
worker's loop call `check()`, where the signal's handler runs, once, from a place that expects it (raising
`Interrupted`, or submitit's SystemExit once it has requeued a Slurm job). What the handler raised is raised
again at every later check, so a stop that some library swallows still stops the run, and no handler (such as
submitit's requeue) runs twice.

Who does what:
- a launcher, outside trials (`install(worker=False)`): SIGTERM or Ctrl-C raises Interrupted at once; a second
  one ends the process;
- a launcher running its one trial itself: the first signal stops the trial at the next check; a second stops it
  at once, wherever it lands; more are ignored while the stopped trial is recorded;
- a launcher with worker processes (`forwarding`): passes SIGTERM on to them; a second signal kills them;
- a worker process (`install(worker=True)`): SIGTERM stops its trial at the next check, and repeats are ignored
  (`timeout`, systemd or a signal to the process group reach it both directly and through its launcher);
  Ctrl-C is left to the launcher; Slurm's USR2 runs submitit's handler at the next check; a worker whose
  launcher died stops by itself (`stop_when_orphaned`).

Besides signals, a thread may stop the run in progress (`stop_run`): a sweep worker's heartbeat that finds its
trial taken over by another worker (`Superseded`). That stop ends the run only, not the process: `run_stopped()`
clears it for the next one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

STOPS = (signal.SIGTERM, signal.SIGINT)
# what signal.getsignal returns and signal.signal takes
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_pending: list[Callable[[], None]] = []  # the signal recorded, not acted on yet
_raised: list[BaseException] = []  # what acting on it raised: raised again at every later check
_recording: dict[int, Callable] = {}  # inside `deferred`: the handlers that record each signal
_run_stop: list[BaseException] = []  # set by another thread: raised at every check until the run has stopped


class Interrupted(BaseException):
    """SIGTERM or SIGINT: stop the trial (it resumes when the sweep is re-run) and the process."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class Superseded(BaseException):
    """Another process took over the run in progress (a sweep worker taken for dead while it trained)."""


def stop_run(err: BaseException) -> None:
    """From any thread: the run in progress raises `err` at its next check."""
    _run_stop[:] = [err]


def run_stopped() -> None:
    """The run that `stop_run` stopped has ended: the next run goes on."""
    _run_stop.clear()


def raised_by_signal(err: BaseException) -> bool:
    """Whether `err` is what a signal's handler raised (submitit's SystemExit for a requeued Slurm job, say), not
    an exception of the run's own code."""
    return any(err is r for r in _raised)


def install(worker: bool) -> dict[signal.Signals, Handler]:
    """The handlers outside trials (see the module's docstring); returns the previous ones for `restore`."""
    previous = {s: signal.getsignal(s) for s in STOPS}
    then = signal.SIG_IGN if worker else signal.SIG_DFL

    def handler(signum, frame):
        for s in STOPS:
            signal.signal(s, then)
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.SIG_IGN if worker else handler)
    return previous


def ignore_stops() -> None:
    for s in STOPS:
        signal.signal(s, signal.SIG_IGN)


def restore(previous: dict[signal.Signals, Handler]) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


@contextlib.contextmanager
def deferred(*signums: int, repeat_acts_now: bool = False) -> Iterator[None]:
    """Inside, each of these signals' current handlers runs at the next `check()`. Of signals arriving before it,
    only the first is acted on: a second is ignored, or with `repeat_acts_now` acts at once, wherever it lands
    (a second Ctrl-C), and then stop signals are ignored until the block is left. Signals arriving after it are
    ignored."""
    wrapped = {
        s: (h, functools.partial(_record, h, repeat_acts_now)) for s in signums if callable(h := signal.getsignal(s))
    }
    for signum, (_, wrapper) in wrapped.items():
        signal.signal(signum, wrapper)
    _recording.update({signum: wrapper for signum, (_, wrapper) in wrapped.items()})
    stopped = False
    try:
        yield
    except BaseException:
        stopped = bool(_raised)
        raise
    finally:
        for signum, (handler, wrapper) in wrapped.items():
            if signal.getsignal(signum) is wrapper:  # not where a repeat has moved on to ignoring signals
                signal.signal(signum, signal.SIG_IGN if stopped and signum in STOPS else handler)
        _pending.clear()
        _raised.clear()
        _recording.clear()


def _record(handler: Callable, repeat_acts_now: bool, signum: int, frame) -> None:
    if _raised:  # acted on already: the run is stopping, and its record must not be cut short
        return
    if not _pending:
        _pending.append(functools.partial(handler, signum, None))
    elif repeat_acts_now:
        ignore_stops()
        check()


def check() -> None:
    """Act on the signal recorded since the last check (run its handler); once a handler has raised, raise the
    same again at every check."""
    if _pending:
        act = _pending.pop()
        try:
            act()
        except BaseException as err:
            _raised.append(err)
            # the handler may have re-armed signals (a launcher's lets a second one kill the process): inside the
            # block they stay recorded, i.e. ignored, so a second signal cannot cut the stopped trial's record short
            for signum, recording in _recording.items():
                signal.signal(signum, recording)
            raise
    if _raised:
        raise _raised[0]
    if _run_stop:
        raise _run_stop[0]


def sleep(seconds: float) -> None:
    """time.sleep that a recorded signal ends at once."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        check()
        time.sleep(min(left, 0.1))
    check()


@contextlib.contextmanager
def between_steps(worker: bool) -> Iterator[None]:
    """While trials run: stop signals (and Slurm's USR2) are acted on at the next check; a repeated one is
    ignored by a worker process and stops a launcher's own trial at once."""
    with deferred(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, repeat_acts_now=not worker):
        yield


@contextlib.contextmanager
def forwarding(children: Callable[[], Iterable[subprocess.Popen]]) -> Iterator[list[int]]:
    """A launcher with worker processes: SIGTERM or Ctrl-C is passed on to them as SIGTERM, a second one kills
    them. Yields the signals received, in order."""
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in children():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, forward) for s in STOPS}
    try:
        yield received
    finally:
        restore(previous)


def stop_when_orphaned(parent_pid: int) -> None:
    """A worker whose launcher died (even by kill -9) stops like on SIGTERM instead of running on unattended."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        log.warning("worker %d: the launcher (pid %d) is gone; stopping", os.getpid(), parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
