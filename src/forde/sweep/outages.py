"""Riding out a storage that is away for a while (up to OUTAGE_S): `patiently` makes a call again until the storage
is back, and every process remembers when it last saw the storage fail, since no heartbeat reaches a storage that
is away: a trial's silence counts only from then (forde.sweep.lifecycle.gone)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from forde import interrupts
from forde.sweep.lifecycle import OUTAGE_S, STORAGE_ERRORS, describe, is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")

_started = time.time()
_last_unavailable = 0.0  # wall-clock time this process last saw the storage fail


def saw_unavailable() -> None:
    global _last_unavailable
    _last_unavailable = time.time()


def storage_up_since() -> float:
    """Since when this process has seen the storage up without a break (its start counts as a break: it cannot
    tell what happened before)."""
    return max(_started, _last_unavailable)


def patiently(call: Callable[..., T], *args, what: str = "", **kwargs) -> T:
    """`call(*args, **kwargs)`, made again with growing pauses while the storage is unavailable for a transient
    reason, up to OUTAGE_S seconds; `call` must be safe to repeat. A signal ends the wait."""
    deadline, pause = time.monotonic() + OUTAGE_S, 1.0
    while True:
        try:
            return call(*args, **kwargs)
        except STORAGE_ERRORS as err:
            saw_unavailable()
            if not is_transient(err) or time.monotonic() + pause > deadline:
                raise
            log.warning(
                "storage unavailable%s (%s); trying again in %d s (for up to %d s in all)",
                f" while {what}" if what else "",
                describe(err),
                pause,
                OUTAGE_S,
            )
            interrupts.sleep(pause)
            pause = min(pause * 2, 30.0)
