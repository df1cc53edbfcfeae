"""Signals acted on at known points of a run instead of wherever they land.

A Python signal handler runs between two bytecodes of whatever the main thread is doing, and an exception
it raises there can be swallowed or replaced by library code caught half-way: OmegaConf, interrupted while
it built a checkpoint's config, raised an AttributeError of its own instead, and the sweep took a stopped
trial for a failure of the environment and went on. A sweep worker therefore only records a signal; the
training loop, the evaluation loop and the worker's own loop call `check()`, where the signal's handler
then runs (raising `Interrupted`, or submitit's SystemExit on preemption) from a place that expects it.
Where nothing was deferred, `check()` does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from typing import Callable, Iterator

_pending: list[Callable[[], None]] = []  # the signal recorded, not acted on yet
_acted: list[Callable[[], None]] = []    # the signal acted on


@contextlib.contextmanager
def deferred(*signums: int, repeat_acts_now: bool = False) -> Iterator[None]:
    """Inside, each of these signals' current handlers runs at the next `check()`. Of signals arriving before
    it, only the first is acted on: a second is ignored (a worker gets SIGTERM both directly and through its
    launcher), or with `repeat_acts_now` makes the first act at once, wherever it lands (a second Ctrl-C)."""
    wrapped = {s: (h, functools.partial(_record, h, repeat_acts_now)) for s in signums if callable(h := signal.getsignal(s))}
    for signum, (_, wrapper) in wrapped.items():
        signal.signal(signum, wrapper)
    try:
        yield
    finally:
        for signum, (handler, wrapper) in wrapped.items():
            if signal.getsignal(signum) is wrapper:  # not where a handler has moved on (e.g. to ignore repeats)
                signal.signal(signum, handler)
        _pending.clear()
        _acted.clear()


def _record(handler: Callable, repeat_acts_now: bool, signum: int, frame) -> None:
    if not _pending:
        _pending.append(functools.partial(handler, signum, None))
    elif repeat_acts_now:
        check()


def check() -> None:
    """Run the handler of the signal recorded since the last check; once one has run, run it again at every
    check, so that its exception, should some library catch and replace it, still stops the run."""
    if _pending:
        _acted[:] = [_pending.pop()]
    if _acted:
        _acted[0]()


def sleep(seconds: float) -> None:
    """time.sleep that a recorded signal ends at once."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        check()
        time.sleep(min(left, 0.1))
    check()
