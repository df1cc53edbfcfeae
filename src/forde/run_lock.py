"""A run directory is trained by one process at a time: an flock on `.NAME.lock` beside it (outside, so archiving
the directory's files never moves it), naming its holder's host and pid. The kernel drops the lock when the
process ends, however it ends. Re-entrant within a process: a sweep's worker holds it around `train`, which takes
it again."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from forde.config import ConfigError

_held: dict[Path, int] = {}  # the locks this process holds, and how many times


class RunLocked(ConfigError):
    """Another process trains this run directory."""


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def holder(run_dir: Path) -> str:
    """Who holds (or last held) the lock: 'host:pid', or '' when nobody wrote it."""
    try:
        return lock_path(run_dir).read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def hold(run_dir: Path, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `run_dir`'s lock while the block runs. While another process holds it, `waiting(holder)` is called
    about once a second (it may raise to give up); without `waiting`, RunLocked is raised at once."""
    path = lock_path(Path(run_dir).resolve())
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a link there must not be written through
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; it locks {run_dir}: remove the link") from None
        raise
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                who = holder(run_dir) or "another process"
                if waiting is None:
                    raise RunLocked(
                        f"run directory {run_dir} is being trained by {who}; wait for it to end, or give this run "
                        "another run.name"
                    ) from None
                waiting(who)
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode(), 0)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
