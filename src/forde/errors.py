"""The errors that reach a user as one line before any training starts, and the one way an exception is
summarised in such a line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value, raised before any training starts."""


class MissingDataError(ConfigError):
    """A dataset or prepared input is not on disk: a problem of the machine, not of the config (sweeps retry
    such trials instead of counting them as failed)."""


class DataError(MissingDataError):
    """A dataset or prepared input on disk that cannot be used as it is (unreadable, cut short, of the wrong
    shape, or refused as unsafe): like a missing one, a problem of the machine, found before any training."""


class RunError(RuntimeError):
    """A run that cannot go on as it is; the message says why and the fix in one line (no bug: no traceback)."""


class RunDirError(RunError):
    """A run directory's files cannot be read back, or written; the message names the file and the fix."""


class NonFiniteLossError(RunError):
    """Training diverged; the message says where, names the last good checkpoint if there is one, and the fix."""


def one_line(err: BaseException) -> str:
    """'Type: first line of the message': how an error is quoted inside a one-line message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
