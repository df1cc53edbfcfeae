"""The heartbeats of a study's running trials: how a worker shows it is alive, and learns that it was taken for dead.

A running trial's worker records one every HEARTBEAT_S seconds. In a database it is a system attribute of the trial
(one row, updated); beside a journal, one file per running trial whose modification time is the beat (the journal
itself does not grow with them). Both are timed by the clocks of the machines (keep them in sync, e.g. with NTP).

A worker cut off from the storage longer than GRACE_S while the others saw it up is taken for dead and its trial
queued again; when its beats reach the storage again it finds its trial failed, and stops it (`superseded`): the
retry resumes from the checkpoint, and the run directory's lock (forde.run_lock) keeps the two from writing it at
the same time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from forde.sweep.lifecycle import HEARTBEAT_S, REASON, STORAGE_ERRORS, describe
from forde.sweep.outages import saw_unavailable
from forde.sweep.records import Records

log = logging.getLogger(__name__)

HEARTBEAT = "forde:heartbeat"  # the trial's system attribute, in a database


class Heartbeats:
    def __init__(self, records: Records, journal: Path | None, key: str):
        """`journal`: the journal file of a journal storage (beats are files beside it), else None (a database)."""
        self.records = records
        self.folder = Path(f"{journal}.heartbeats") if journal is not None else None
        self.prefix = key

    def _file(self, number: int) -> Path:
        assert self.folder is not None  # heartbeat files: journal storages only
        return self.folder / f"{self.prefix}-{number}"

    def beat(self, number: int) -> bool:
        """Record a beat; False when the trial is no longer running (another worker failed it)."""
        if self.folder is None:
            return self.records.set_system_attr(number, HEARTBEAT, time.time())
        if self.folder.is_symlink():  # its files are created and deleted: never in a folder a link leads to
            raise OSError(errno.ELOOP, "the heartbeats' folder is a symbolic link; remove the link", str(self.folder))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file(number).touch()
        return self.records.get(number).state == TrialState.RUNNING

    def last(self, t: FrozenTrial) -> float:
        """When the trial's worker last showed it was alive (its start, before a first beat)."""
        started = t.datetime_start.timestamp() if t.datetime_start else time.time()
        if self.folder is None:
            return t.system_attrs.get(HEARTBEAT, started)
        try:
            return os.stat(self._file(t.number)).st_mtime
        except FileNotFoundError:
            return started

    def forget(self, number: int) -> None:
        if self.folder is not None:
            self._file(number).unlink(missing_ok=True)

    @contextlib.contextmanager
    def running(self, number: int, superseded: Callable[[str], None]) -> Iterator[None]:
        """Beat every HEARTBEAT_S seconds while the trial runs; a storage that is away skips beats. Once a beat
        finds the trial failed by another worker, `superseded(why)` is called and beating stops."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    if not self.beat(number):
                        reason = self.records.get(number).user_attrs.get(REASON, "failed by another worker")
                        superseded(reason)
                        return
                except Exception as err:  # a beat lost is no reason to stop beating
                    if isinstance(err, STORAGE_ERRORS):
                        saw_unavailable()
                    log.warning("heartbeat of trial %d not recorded: %s", number, describe(err))

        thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
