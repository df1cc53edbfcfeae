"""What kind of filesystem a study's files lie on, and how SQLite is used there."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

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
