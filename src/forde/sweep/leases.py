"""A lock on a shared filesystem (NFS included) that is a lease: held while its holder refreshes it, taken over
only once it has expired, released only by its holder.

A lease is a folder of numbered files. Whoever creates file N+1 with O_EXCL, while file N is released or has
expired, holds the lease; creating a file is atomic on every filesystem, so of many waiters that saw N expire
exactly one takes it over. The holder touches its file every `refresh_s` seconds from a thread of its own (a
slow critical section, a long journal replay or a stalled filesystem does not lose it); a file unchanged for
`ttl_s` seconds of the observer's own clock has expired (its holder died, or was suspended: SIGSTOP, Slurm
suspend). Releasing adds `N.free` beside file N and touches nothing of a newer holder's, so a holder that
resumes after losing the lease cannot undo the lock of the one that took it over. The highest number is never
deleted: a waiter that read the folder long ago and creates a lower number finds a higher one and backs off.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import threading
import time
from pathlib import Path

from forde.sweep.lifecycle import TRANSIENT_ERRNOS

log = logging.getLogger(__name__)

FREE = ".free"


class FileLease:
    def __init__(self, folder: Path, ttl_s: float, refresh_s: float):
        self.folder, self.ttl_s, self.refresh_s = Path(folder), ttl_s, refresh_s
        self.token = ""
        self.number = 0
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def _numbers(self) -> tuple[list[int], set[int]]:
        """The lease files' numbers (ascending) and those released."""
        names = os.listdir(self.folder)
        return (
            sorted(int(n) for n in names if n.isdigit()),
            {int(n[: -len(FREE)]) for n in names if n.endswith(FREE) and n[: -len(FREE)].isdigit()},
        )

    def _file(self, number: int) -> Path:
        return self.folder / f"{number:012d}"

    def __enter__(self) -> FileLease:
        if self.folder.is_symlink():  # its files are created and deleted: never in a folder a link leads to
            raise OSError(errno.ELOOP, "the lease's folder is a symbolic link; remove the link", str(self.folder))
        self.folder.mkdir(parents=True, exist_ok=True)
        watched, since, delay = None, 0.0, 0.01
        while True:
            numbers, free = self._numbers()
            top = numbers[-1] if numbers else 0
            if top and top not in free:
                try:
                    seen = (top, os.stat(self._file(top)).st_mtime_ns)
                except FileNotFoundError:
                    continue
                if seen != watched:
                    watched, since = seen, time.monotonic()
                if time.monotonic() - since <= self.ttl_s:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                log.warning(
                    "taking over the lock %s: its holder (%s) has not renewed it for %d s (it died, or was suspended)",
                    self.folder,
                    _read(self._file(top)) or "unknown",
                    self.ttl_s,
                )
            if self._claim(top + 1):
                return self

    def _claim(self, number: int) -> bool:
        token = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(8)}"
        try:
            fd = os.open(self._file(number), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(token)
        numbers, _ = self._numbers()
        if numbers[-1] > number:  # a claim made on an old reading of the folder: someone holds a newer one
            self._file(number).unlink(missing_ok=True)
            return False
        self.token, self.number = token, number
        for old in self.folder.iterdir():  # earlier holders' files: nobody can claim them again
            stem = old.name.removesuffix(FREE)
            if stem.isdigit() and int(stem) < number:
                old.unlink(missing_ok=True)
        self._stop.clear()
        self._refresher = threading.Thread(target=self._refresh, daemon=True, name="lease")
        self._refresher.start()
        return True

    def held(self) -> bool:
        """Whether this process still holds the lease (no one took it over)."""
        return (
            bool(self.token)
            and _read(self._file(self.number)) == self.token
            and not (self.folder / f"{self._file(self.number).name}{FREE}").exists()
            and self._numbers()[0][-1] == self.number
        )

    def _refresh(self) -> None:
        """Renew the lease every refresh_s; a filesystem that stalls for a moment (an NFS EIO or ESTALE) skips a
        renewal, and only a lease file that is gone (taken over and cleaned up) ends the renewals."""
        failing = False
        while not self._stop.wait(self.refresh_s):
            try:
                os.utime(self._file(self.number))
                failing = False
            except OSError as err:
                if err.errno not in TRANSIENT_ERRNOS:
                    log.error(
                        "the lock %s was lost (%s): it was not renewed for %d s and another process took it over",
                        self.folder,
                        err.strerror,
                        self.ttl_s,
                    )
                    return
                if not failing:
                    log.warning("the lock %s could not be renewed (%s); trying again", self.folder, err.strerror)
                failing = True

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        if self.held():
            (self.folder / f"{self._file(self.number).name}{FREE}").touch()
        elif self.token:
            log.error(
                "the lock %s was taken over while this process held it (suspended for more than %d s?)",
                self.folder,
                self.ttl_s,
            )
        self.token, self.number = "", 0


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
