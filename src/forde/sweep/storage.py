"""Where a study lives. One `--storage` value becomes an Optuna storage, with its reachability check, the
lock that holds the trial budget (forde.sweep.locks) and the heartbeats of its running trials
(forde.sweep.heartbeats); forde.sweep.outages rides out a storage that is away for a while.

    sqlite:///PATH                    one machine (the default: study.db in the study directory)
    postgresql://USER@HOST:PORT/DB    many machines sharing a database server (`pip install -e .[postgres]`)
    journal:PATH                      many machines sharing a filesystem, no server (Optuna's JournalStorage,
                                      an append-only log; what Optuna recommends for clusters without a database)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from forde.config import ConfigError
from forde.sweep import locks
from forde.sweep.filesystems import sqlite_connector
from forde.sweep.heartbeats import Heartbeats
from forde.sweep.lifecycle import describe
from forde.sweep.outages import patiently
from forde.sweep.records import Records

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

CONNECT_TIMEOUT_S = 10
# TCP keepalives of the connections to PostgreSQL: a server or peer that vanished is noticed in about 25 s
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
JOURNAL_PREFIX = "journal:"
DEFAULT_SQLITE, DEFAULT_JOURNAL = "study.db", "journal.log"


class StorageError(ConfigError):
    """The storage cannot be used; raised before any data is prepared, with the fix."""


def default_url(study_dir: Path, kind: str = "sqlite") -> str:
    """The storage of a study directory when no --storage is given: a SQLite file, or a journal file."""
    path = (study_dir / (DEFAULT_SQLITE if kind == "sqlite" else DEFAULT_JOURNAL)).resolve()
    return f"sqlite:///{path}" if kind == "sqlite" else f"{JOURNAL_PREFIX}{path}"


def driver_url(url: str) -> str:
    """`postgresql://` with the driver the `postgres` extra installs (psycopg 3): SQLAlchemy before 2.1 would
    pick psycopg2, which is not installed."""
    return "postgresql+psycopg://" + url[len("postgresql://") :] if url.startswith("postgresql://") else url


def key(study_name: str) -> str:
    """A study's name as a file-name part: any name, no path."""
    return hashlib.sha1(study_name.encode()).hexdigest()[:12]


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

    def _connect_args(self) -> dict:
        return {"connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES}

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
                    else {"pool_pre_ping": True, "connect_args": self._connect_args()}
                )
                self._optuna = RDBStorage(driver_url(self.url), engine_kwargs=kwargs)
        return self._optuna

    def records(self, study_name: str) -> Records:
        return Records(self.optuna, study_name)

    def heartbeats(self, records: Records, study_name: str) -> Heartbeats:
        return Heartbeats(records, self.path if self.kind == "journal" else None, key(study_name))

    def exists(self) -> bool:
        """Whether the storage holds Optuna's records already, seen without creating them (opening it creates them)."""
        if self.path is not None:
            return self.path.exists()
        from sqlalchemy import create_engine, inspect

        engine = create_engine(driver_url(self.url), connect_args=self._connect_args())
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
            with self._creation_lock():
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

    def _creation_lock(self) -> contextlib.AbstractContextManager:
        """Two launchers opening a new SQLite file at once would both create Optuna's tables: one at a time."""
        if self.kind != "sqlite":
            return contextlib.nullcontext()
        path = self._file()
        return locks.file_lock(path.with_name(f".{path.name}.lock"))

    def _read_once(self) -> None:
        try:
            self.optuna.get_all_studies()
        except Exception:
            self._optuna = None  # a storage that never opened is built again on the next try
            raise

    @contextlib.contextmanager
    def budget_lock(self, study_name: str) -> Iterator[locks.Held]:
        """Serialise 'read the study, decide, take a trial' across every worker of the study, on every machine."""
        if self.kind == "postgresql":
            if self._lock_engine is None:
                from sqlalchemy import create_engine

                self._lock_engine = create_engine(
                    driver_url(self.url), pool_pre_ping=True, pool_size=1, connect_args=self._connect_args()
                )
            with locks.advisory_lock(self._lock_engine, study_name) as held:
                yield held
        elif self.kind == "sqlite":
            path = self._file()
            with locks.file_lock(path.with_name(f".{path.name}.{key(study_name)}.lock")) as held:
                yield held
        else:
            with locks.lease_lock(Path(f"{self.path}.{key(study_name)}.budget")) as held:
                yield held
