"""Files that appear whole or not at all: written under a temporary name beside the target, then renamed.

A write stopped part-way (a full disk, Ctrl-C, a kill) leaves the previous file, or none, and no
temporary file behind; an OSError without a file name (a write on a full disk names none) gets the
target's, so that its one-line message says where.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, cast


def temporary_name(path: Path) -> Path:
    """Hidden, beside `path`, and unique per process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def removed_on_failure(tmp: Path, target: Path) -> Iterator[None]:
    """Remove `tmp` (a file or a folder) when the block fails, and name `target` in a nameless OSError."""
    try:
        yield
    except BaseException as err:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # e.g. a read-only file system: the error that got here is the news
                tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), str(target)) from err
        raise


def unwritable(folder: Path) -> str | None:
    """None when `folder` takes new files; else why not (e.g. 'Read-only file system'), found by writing one."""
    probe = temporary_name(folder / "write-test")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return err.strerror or str(err)
    return None


def write_atomic(path: Path, data: str | bytes) -> None:
    replace_atomic(path, lambda fh: fh.write(data.encode() if isinstance(data, str) else data))


def replace_atomic(path: Path, write: Callable[[BinaryIO], object], keep: Path | None = None) -> None:
    """Write `path` with `write(file)` under a temporary name, then rename it into place; the file it replaces
    moves to `keep` when given (a checkpoint keeps the one before)."""
    tmp = temporary_name(path)
    with removed_on_failure(tmp, path):
        with open(tmp, "wb") as fh:
            recording = _RecordingFile(fh)
            try:
                write(cast(BinaryIO, recording))  # write() and flush() are what the writers call
            except Exception:
                if recording.error is None:
                    raise
                raise recording.error from None  # what torch.save reports as "unexpected pos"
        if keep is not None and path.exists():
            os.replace(path, keep)
        os.replace(tmp, path)


class _RecordingFile:
    """A file that keeps its first write error: torch.save turns a full disk into 'unexpected pos'."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.fh.flush()
