"""Where a study lives. One `--storage` value becomes an Optuna storage, with its reachability check, the
lock that holds the trial budget, the heartbeats that tell a dead worker's trial from a running one, and the
patience that rides out an outage.

    sqlite:///PATH                    one machine (the default: study.db in the study directory)
    postgresql://USER@HOST:PORT/DB    many machines sharing a database server (`pip install -e .[postgres]`)
    journal:PATH                      many machines sharing a filesystem, no server (Optuna's JournalStorage,
                                      an append-only log; what Optuna recommends for clusters without a database)

Outages: a call that fails because the database or the filesystem is unavailable is made again, with pauses,
for up to OUTAGE_S seconds (`patiently`); only reads and writes that may be repeated are retried (a decision of
the worker as a whole, which reads the study again; setting an attribute, a reported value, a final state).

Heartbeats: a running trial's worker records one every HEARTBEAT_S seconds; a trial without one for GRACE_S
seconds is stale (its worker was killed, or its machine lost). In a database they are a system attribute of
the trial (one row, updated); beside a journal, one file per running trial whose modification time is the beat
(the journal itself does not grow with them). Both are timed by the clocks of the machines (keep them in sync,
e.g. with NTP).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial

from forde import interrupts
from forde.config import ConfigError
from forde.sweep.leases import FileLease

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

HEARTBEAT_S = 20
GRACE_S = 60
OUTAGE_S = 300  # how long a storage may be unavailable before a worker counts it as a failure of the environment
LEASE_REFRESH_S = 5
CONNECT_TIMEOUT_S = 10
JOURNAL_PREFIX = "journal:"
HEARTBEAT = "forde:heartbeat"
DEFAULT_SQLITE, DEFAULT_JOURNAL = "study.db", "journal.log"
T = TypeVar("T")

# What a storage raises when the database or the filesystem under it fails.
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, OSError)
# ... and of those, what passes: a dropped or refused connection, a locked database, a filesystem that stalled.
TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.ESTALE,
    errno.ETIMEDOUT,
    errno.ENOTCONN,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EAGAIN,
}
LASTING = ("no space left", "disk is full", "diskfull", "read-only", "readonly", "permission denied", "quota")


class StorageError(ConfigError):
    """The storage cannot be used; raised before any data is prepared, with the fix."""


def causes(err: BaseException) -> list[BaseException]:
    """`err` and the errors the database layer wrapped in it: Optuna's StorageInternalError around SQLAlchemy's
    error, around the driver's own (`orig`)."""
    chain = [err]
    while (
        is_storage_error(chain[-1])
        and (inner := getattr(chain[-1], "orig", None) or chain[-1].__cause__) is not None
        and inner not in chain
    ):
        chain.append(inner)
    return chain


def root_cause(err: BaseException) -> BaseException:
    """The driver's or the system's own error (Optuna's StorageInternalError says "invalid data in the commit"
    for a refused connection and for a full disk alike)."""
    return causes(err)[-1]


def is_storage_error(err: BaseException) -> bool:
    """An error of the database layer (an OSError of the journal's file is judged by its errno, as any OSError)."""
    return isinstance(err, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError))


def is_transient(err: BaseException) -> bool:
    """Whether waiting may cure it: a connection or a filesystem that comes back, not a full disk or a denied write."""
    cause = root_cause(err)
    if any(word in f"{type(cause).__name__}: {cause}".lower() for word in LASTING):
        return False
    if isinstance(cause, OSError):
        return cause.errno in TRANSIENT_ERRNOS or isinstance(cause, (ConnectionError, TimeoutError))
    return any(isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) for e in causes(err))


def patiently(call: Callable[..., T], *args, what: str = "", **kwargs) -> T:
    """`call(*args, **kwargs)`, made again with growing pauses while the storage is unavailable for a transient
    reason, up to OUTAGE_S seconds; `call` must be safe to repeat. A signal ends the wait."""
    deadline, pause = time.monotonic() + OUTAGE_S, 1.0
    while True:
        try:
            return call(*args, **kwargs)
        except STORAGE_ERRORS as err:
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


def describe(err: BaseException) -> str:
    """'Type: first line of the message', of the root cause."""
    cause = root_cause(err)
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


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


def driver_url(url: str) -> str:
    """`postgresql://` with the driver the `postgres` extra installs (psycopg 3): SQLAlchemy before 2.1 would
    pick psycopg2, which is not installed."""
    return "postgresql+psycopg://" + url[len("postgresql://") :] if url.startswith("postgresql://") else url


@dataclass
class SweepStorage:
    url: str
    _optuna: BaseStorage | None = field(default=None, repr=False)
    _lock_engine: Engine | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.url.startswith(("sqlite:///", "postgresql", JOURNAL_PREFIX)):
            raise StorageError(
                f"--storage {self.url!r}: give sqlite:///PATH, postgresql://USER@HOST/DB or journal:PATH"
            )

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
            return Path(self.url[len(JOURNAL_PREFIX) :]).expanduser().resolve()
        if self.kind == "sqlite":
            return Path(self.url[len("sqlite:///") :])
        return None

    def _file(self) -> Path:
        """`path`, for the storages that have one (SQLite, journal)."""
        if self.path is None:
            raise TypeError(f"storage {self.display} is a {self.kind} database, not a file")
        return self.path

    @property
    def optuna(self) -> BaseStorage:
        """What Optuna's functions take as `storage` (a database storage, which Optuna then reads through its
        cache of finished trials, or the journal)."""
        if self._optuna is None:
            if self.kind == "journal":
                self._optuna = JournalStorage(JournalFileBackend(str(self.path), JournalFileOpenLock(str(self.path))))
            else:
                kwargs = (
                    {"creator": sqlite_connector(self._file())}
                    if self.kind == "sqlite"
                    else {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
                )
                self._optuna = RDBStorage(driver_url(self.url), engine_kwargs=kwargs)
        return self._optuna

    def exists(self) -> bool:
        """Whether the storage holds Optuna's records already, seen without creating them (opening it creates them)."""
        if self.path is not None:
            return self.path.exists()
        from sqlalchemy import create_engine, inspect

        engine = create_engine(driver_url(self.url), connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
        try:
            return inspect(engine).has_table("studies")
        finally:
            engine.dispose()

    def check(self, patient: bool = False) -> None:
        """Open the storage and read it once: an unreachable server or an unwritable file fails here, at once
        (`patient`: after waiting out an outage, for workers of a launcher that has checked it already)."""
        if self.path is not None:
            folder = self.path.parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(
                    f"storage {self.display}: cannot create {folder} ({err.strerror}); choose another path"
                ) from None
            if not os.access(folder, os.W_OK):
                raise StorageError(f"storage {self.display}: {folder} is not writable; choose a writable path")
        try:
            if patient:
                patiently(self._read_once, what="opening the study")
            else:
                self._read_once()
        except Exception as err:  # whatever the driver raises: say what and how to fix it, in one line
            self._optuna = None
            hint = {
                "postgresql": "check that the server runs, the host, port, user and database, and that the "
                "driver is installed (`pip install -e .[postgres]`)",
                "sqlite": "check the path and that no other program holds the file locked",
                "journal": "check that the path is on a shared, writable filesystem",
            }[self.kind]
            raise StorageError(f"cannot use the storage {self.display}: {describe(err)}; {hint}") from None

    def _read_once(self) -> None:
        try:
            self.optuna.get_all_studies()
        except Exception:
            self._optuna = None  # a storage that never opened is built again on the next try
            raise

    # -- the budget lock -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def budget_lock(self, study_name: str) -> Iterator[None]:
        """Serialise 'read the study, decide, take a trial' across every worker of the study, on every machine."""
        if self.kind == "postgresql":
            with self._advisory_lock(study_name):
                yield
        elif self.kind == "sqlite":
            path = self._file()
            with _flock(path.with_name(f".{path.name}.{_key(study_name)}.lock")):
                yield
        else:
            with FileLease(Path(f"{self.path}.{_key(study_name)}.budget"), ttl_s=GRACE_S, refresh_s=LEASE_REFRESH_S):
                yield

    @contextlib.contextmanager
    def _advisory_lock(self, study_name: str) -> Iterator[None]:
        from sqlalchemy import create_engine, text

        if self._lock_engine is None:
            self._lock_engine = create_engine(
                driver_url(self.url),
                pool_pre_ping=True,
                pool_size=1,
                connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
            )
        key = int(hashlib.sha1(study_name.encode()).hexdigest()[:15], 16)
        with self._lock_engine.connect() as conn:  # a session lock: the server drops it if this process dies
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                with contextlib.suppress(*STORAGE_ERRORS):
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})

    # -- heartbeats ----------------------------------------------------------------------------------
    def heartbeats(self, study_name: str) -> Heartbeats:
        return Heartbeats(self, study_name)


class Heartbeats:
    """The heartbeats of one study's running trials."""

    def __init__(self, storage: SweepStorage, study_name: str):
        self.storage = storage
        self.folder = Path(f"{storage.path}.heartbeats") if storage.kind == "journal" else None
        self.prefix = _key(study_name)

    def _file(self, number: int) -> Path:
        assert self.folder is not None  # heartbeat files: journal storages only
        return self.folder / f"{self.prefix}-{number}"

    def beat(self, number: int, trial_id: int) -> None:
        if self.folder is None:
            self.storage.optuna.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file(number).touch()

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
    def running(self, number: int, trial_id: int) -> Iterator[None]:
        """Beat every HEARTBEAT_S seconds while the trial runs; a storage hiccup skips a beat (GRACE_S allows two)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    self.beat(number, trial_id)
                except Exception as err:
                    log.warning("heartbeat of trial %d not recorded: %s", number, describe(err))

        thread = threading.Thread(target=beat, daemon=True, name="heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


NETWORK_FILESYSTEMS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "ceph",
    "glusterfs",
    "beegfs",
    "9p",
    "fuse.sshfs",
    "afs",
    "panfs",
    "wekafs",
)


def on_network_filesystem(path: Path) -> bool:
    """Whether `path` lies on a network filesystem (or where /proc/mounts cannot say)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return True
    target, kind, longest = str(path.resolve()), "unknown", -1
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > longest:
            longest, kind = len(point), fstype
    return kind in NETWORK_FILESYSTEMS


def sqlite_connector(path: Path) -> Callable[[], sqlite3.Connection]:
    """Connections to a study's SQLite file. On a local disk it is written ahead (WAL, synchronous=NORMAL): a
    commit costs no flush to disk, and a killed process loses nothing; a power cut may lose the last records,
    which the sweep recovers (their workers are taken for dead, their trials resume from their checkpoints).
    On a network filesystem, where SQLite's write-ahead log does not work, a rollback journal flushed at each
    commit, as SQLite does by default."""
    network = on_network_filesystem(path.parent)

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
        conn.execute(f"PRAGMA journal_mode={'DELETE' if network else 'WAL'}")
        conn.execute(f"PRAGMA synchronous={'FULL' if network else 'NORMAL'}")
        return conn

    return connect


def _key(study_name: str) -> str:
    """A study's name as a file-name part: any name, no path."""
    return hashlib.sha1(study_name.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
