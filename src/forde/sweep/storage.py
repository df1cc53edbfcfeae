"""Where a study lives. One `--storage` value becomes an Optuna storage, with its reachability check, the
lock that holds the trial budget, and the heartbeats that tell a dead worker's trial from a running one.

    sqlite:///PATH                    one machine (the default: study.db in the study directory)
    postgresql://USER@HOST:PORT/DB    many machines sharing a database server (`pip install -e .[postgres]`)
    journal:PATH                      many machines sharing a filesystem, no server (Optuna's JournalStorage,
                                      an append-only log; what Optuna recommends for clusters without a database)

Heartbeats: a running trial's worker records one every HEARTBEAT_S seconds; a trial without one for
GRACE_S seconds is stale (its worker was killed, or its machine lost). PostgreSQL and SQLite use Optuna's
heartbeat table, timed by the database's clock; the journal records them as trial system attributes,
timed by the workers' clocks (keep them in sync, e.g. with NTP).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState
import sqlalchemy.exc

from forde.config import ConfigError

log = logging.getLogger(__name__)

HEARTBEAT_S = 20
GRACE_S = 60
CONNECT_TIMEOUT_S = 10
RETRY_PAUSES_S = (1, 2, 4, 8, 16)  # a dropped database connection: tried again for half a minute
JOURNAL_PREFIX = "journal:"
JOURNAL_HEARTBEAT = "forde:heartbeat"
DEFAULT_SQLITE, DEFAULT_JOURNAL = "study.db", "journal.log"

# What the storage raises when the database or the filesystem under it is unavailable.
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, OSError, TimeoutError, sqlalchemy.exc.SQLAlchemyError)
# ... and of those, what a new connection may cure: the server restarted, failed over, or dropped the connection.
TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


class StorageError(ConfigError):
    """The storage cannot be used; raised before any data is prepared, with the fix."""


def default_url(study_dir: Path, kind: str = "sqlite") -> str:
    """The storage of a study directory when no --storage is given: a SQLite file, or a journal file."""
    path = (study_dir / (DEFAULT_SQLITE if kind == "sqlite" else DEFAULT_JOURNAL)).resolve()
    return f"sqlite:///{path}" if kind == "sqlite" else f"{JOURNAL_PREFIX}{path}"


def find_url(study_dir: Path) -> str | None:
    """The storage a launcher left in `study_dir`, if any (used by `forde report`)."""
    for kind, name in (("sqlite", DEFAULT_SQLITE), ("journal", DEFAULT_JOURNAL)):
        if (study_dir / name).exists():
            return default_url(study_dir, kind)
    return None


class Retrying:
    """A database storage whose calls are made again, after a pause, when the connection dropped: each call
    is one transaction, rolled back when it fails, so a worker rides out a database restart or failover."""

    def __init__(self, inner: RDBStorage):
        self.inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            for pause in (*RETRY_PAUSES_S, None):
                try:
                    return attr(*args, **kwargs)
                except STORAGE_ERRORS as err:
                    if pause is None or not isinstance(err if isinstance(err, TRANSIENT) else err.__cause__, TRANSIENT):
                        raise
                    log.warning("storage: %s; trying again in %d s", str(err).strip().splitlines()[0], pause)
                    time.sleep(pause)

        return call


@dataclass
class SweepStorage:
    url: str
    _optuna: BaseStorage | Retrying | None = field(default=None, repr=False)
    _lock_engine: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.url.startswith(("sqlite:///", "postgresql", JOURNAL_PREFIX)):
            raise StorageError(f"--storage {self.url!r}: give sqlite:///PATH, postgresql://USER@HOST/DB or journal:PATH")

    @property
    def kind(self) -> str:
        return "journal" if self.url.startswith(JOURNAL_PREFIX) else self.url.split(":")[0].split("+")[0]

    @property
    def display(self) -> str:
        """The URL without its password, for logs."""
        if self.kind != "postgresql":
            return self.url
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    @property
    def path(self) -> Path | None:
        """The file behind a SQLite or journal storage."""
        if self.kind == "journal":
            return Path(self.url[len(JOURNAL_PREFIX):]).expanduser().resolve()
        if self.kind == "sqlite":
            return Path(self.url[len("sqlite:///"):])
        return None

    @property
    def optuna(self) -> BaseStorage | Retrying:
        """What Optuna's functions take as `storage`."""
        if self._optuna is None:
            if self.kind == "journal":
                self._optuna = JournalStorage(JournalFileBackend(str(self.path), JournalFileOpenLock(str(self.path))))
            else:
                kwargs = ({"connect_args": {"timeout": 60}} if self.kind == "sqlite" else
                          {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}})
                # Heartbeats on, stale-trial callback off: the worker re-queues stale trials itself, under the budget lock.
                with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and known to be here
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self._optuna = Retrying(RDBStorage(self.url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                                       grace_period=GRACE_S))
        return self._optuna

    def check(self, patient: bool = False) -> None:
        """Open the storage and read it once: an unreachable server or an unwritable file fails here, at once
        (`patient`: after the retry pauses, for workers of a launcher that has checked it already)."""
        if self.path is not None:
            folder = self.path.parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(f"storage {self.display}: cannot create {folder} ({err.strerror}); choose another path") from None
            if not os.access(folder, os.W_OK):
                raise StorageError(f"storage {self.display}: {folder} is not writable; choose a writable path")
        for pause in (*(RETRY_PAUSES_S if patient else ()), None):
            try:
                backend = self.optuna
                (backend.inner if isinstance(backend, Retrying) else backend).get_all_studies()
                return
            except Exception as err:  # whatever the driver raises: say what and how to fix it, in one line
                self._optuna = None
                if pause is not None:
                    time.sleep(pause)
                    continue
                hint = {"postgresql": "check that the server runs, the host, port, user and database, and that the "
                                      "driver is installed (`pip install -e .[postgres]`)",
                        "sqlite": "check the path and that no other program holds the file locked",
                        "journal": "check that the path is on a shared, writable filesystem"}[self.kind]
                cause = str(getattr(err, "orig", None) or err.__cause__ or err).strip().splitlines()
                raise StorageError(f"cannot use the storage {self.display}: {cause[0] if cause else type(err).__name__}; "
                                   f"{hint}") from None

    # -- the budget lock -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def budget_lock(self, study_name: str):
        """Serialise 'count the trials, start one' across every worker of the study, on every machine."""
        if self.kind == "postgresql":
            with self._advisory_lock(study_name):
                yield
        elif self.kind == "sqlite":
            with _flock(self.path.with_name(f".{self.path.name}.{study_name}.lock")):
                yield
        else:
            with _ExclusiveFile(Path(f"{self.path}.{study_name}.budget.lock")):
                yield

    @contextlib.contextmanager
    def _advisory_lock(self, study_name: str):
        from sqlalchemy import create_engine, text

        if self._lock_engine is None:
            self._lock_engine = create_engine(self.url, pool_pre_ping=True, pool_size=1,
                                              connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
        key = int(hashlib.sha1(study_name.encode()).hexdigest()[:15], 16)
        with self._lock_engine.connect() as conn:  # a session lock: the server drops it if this process dies
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                with contextlib.suppress(*STORAGE_ERRORS):
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})

    # -- heartbeats ----------------------------------------------------------------------------------
    def record_heartbeat(self, trial_id: int) -> None:
        if self.kind == "journal":
            self.optuna.set_trial_system_attr(trial_id, JOURNAL_HEARTBEAT, time.time())
        else:
            self.optuna.record_heartbeat(trial_id)

    @contextlib.contextmanager
    def heartbeat(self, trial_id: int):
        """Record the trial's heartbeat every HEARTBEAT_S seconds while it runs; a storage hiccup skips a beat."""
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                try:
                    self.record_heartbeat(trial_id)
                except Exception as err:  # the next beat may get through; GRACE_S allows for two misses
                    log.warning("heartbeat of trial id %d not recorded: %s", trial_id, str(err).splitlines()[0])

        thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def stale_trial_ids(self, study: optuna.Study) -> list[int]:
        """RUNNING trials whose worker stopped recording heartbeats GRACE_S seconds ago or more."""
        if self.kind != "journal":
            return self.optuna._get_stale_trial_ids(study._study_id)
        now = time.time()
        return [t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if now - t.system_attrs.get(JOURNAL_HEARTBEAT, now) > GRACE_S]


@contextlib.contextmanager
def _flock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _ExclusiveFile:
    """A lock that works on shared filesystems (NFS included): whoever creates the file with O_EXCL holds it.
    A holder that died leaves the file behind; after GRACE_S seconds without change it is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def __enter__(self):
        waited_since, seen = time.monotonic(), None
        delay = 0.01
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode())
                os.close(fd)
                self.held = True
                return self
            except FileExistsError:
                pass
            try:
                stamp = self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if stamp != seen:
                seen, waited_since = stamp, time.monotonic()
            elif time.monotonic() - waited_since > GRACE_S:
                log.warning("taking over the budget lock %s, unchanged for %d s (its holder died?)", self.path, GRACE_S)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def __exit__(self, *exc):
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise
