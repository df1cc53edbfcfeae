"""The budget lock: one worker at a time reads the study, decides and takes a trial, on every machine.

    SQLite      an flock beside the database file (one machine)
    journal     a lease on the shared filesystem (forde.sweep.leases): lost when its holder stops renewing it
    PostgreSQL  a transaction's advisory lock; the server ends a transaction left idle for GRACE_S (a holder that
                was suspended) and TCP keepalives find a connection whose peer is gone, so neither blocks the others

A holder can lose a lease or a transaction while it is stopped (SIGSTOP, a Slurm suspend, a long pause), and go on
as if it held it. So a decision is checked before it is carried out (`check`): a lost lock raises LockLost, and the
worker decides again under a new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from forde.errors import ConfigError
from forde.sweep.leases import FileLease
from forde.sweep.lifecycle import GRACE_S, LEASE_REFRESH_S, STORAGE_ERRORS, describe

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

WAIT_LOG_S = 60  # a worker waiting for the lock says so this often


def open_no_follow(path: Path) -> int:
    """A file descriptor of `path`, created if need be, opened without following a symbolic link."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; the sweep uses it as a lock file: remove the link") from None
        raise


class LockLost(Exception):
    """The budget lock was taken over while this process held it: what it decided may be stale."""


class Held:
    """The lock as its holder sees it."""

    def check(self) -> None:
        """Raise LockLost when this process no longer holds the lock."""


class _LeaseHeld(Held):
    def __init__(self, lease: FileLease):
        self.lease = lease

    def check(self) -> None:
        if not self.lease.held():
            raise LockLost(f"the lease {self.lease.folder} was taken over (this process was stopped past its TTL?)")


class _TransactionHeld(Held):
    def __init__(self, conn: Connection):
        self.conn = conn

    def check(self) -> None:
        from sqlalchemy import text

        try:
            self.conn.execute(text("SELECT 1"))
        except STORAGE_ERRORS as err:
            raise LockLost(f"the lock's connection is gone ({describe(err)}): the server ended it") from None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[Held]:
    """An flock: held until released or the process ends. The file is neither truncated nor reached through a
    symbolic link (a link planted there would lead elsewhere)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_no_follow(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield Held()
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def lease_lock(folder: Path) -> Iterator[Held]:
    with FileLease(folder, ttl_s=GRACE_S, refresh_s=LEASE_REFRESH_S) as lease:
        yield _LeaseHeld(lease)


def advisory_key(name: str) -> int:
    return int(hashlib.sha1(name.encode()).hexdigest()[:15], 16)


@contextlib.contextmanager
def advisory_lock(engine: Engine, name: str) -> Iterator[Held]:
    """A transaction-level advisory lock, waited for without blocking the server, in a transaction the server
    ends once it has been idle GRACE_S seconds."""
    from sqlalchemy import text

    key, waited_since, said = advisory_key(name), time.monotonic(), 0.0
    conn = engine.connect()
    try:
        transaction = conn.begin()
        conn.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {int(GRACE_S * 1000)}"))
        pause = 0.02
        while not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar():
            waited = time.monotonic() - waited_since
            if waited - said >= WAIT_LOG_S:
                said = waited
                log.info("waiting for the budget lock of study '%s' (%.0f s so far)", name, waited)
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        yield _TransactionHeld(conn)
        with contextlib.suppress(*STORAGE_ERRORS):  # ending the transaction releases the lock; a connection the
            transaction.rollback()  # server ended has released it already
    finally:
        with contextlib.suppress(*STORAGE_ERRORS):
            conn.close()
