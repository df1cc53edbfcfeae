"""Names that become file or folder names: one path component each.

Run, study, dataset and class names are read from command lines and from files other people wrote (study
files, run directories, dataset folders). Each is joined to a folder the user chose; a name such as
`../../x` or `/etc` would point outside it, so such names are refused where they enter.
"""

from __future__ import annotations

MAX_BYTES = 255  # the longest file name most filesystems take
RULE = "must be a single file or folder name (not empty, '.' or '..', no '/' or '\\')"


def is_path_component(name: object) -> bool:
    """Whether `name` names one entry inside a folder, and nothing outside it."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and len(name.encode("utf-8", "surrogateescape")) <= MAX_BYTES
    )
