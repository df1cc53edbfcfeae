"""A study's folder (`--out/NAME`) is the study's own: the launcher made it, `study.id` marks it, and no symbolic
link stands where the sweep writes (a link planted there would send its files, or its overwrites, elsewhere).
Checked before the storage is created; the run directories again as each trial starts."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from forde.atomic import write_atomic
from forde.config import ConfigError
from forde.sweep.storage import DEFAULT_JOURNAL, DEFAULT_SQLITE, JOURNAL_PREFIX, default_url

log = logging.getLogger(__name__)

OWNER = "study.id"  # first line: the study's id, which lives in the storage too (forde.sweep.launch.check_owner)
STUDY_FILE, BEST = "study.yaml", "best.md"


class StudyFolderError(ConfigError):
    """The study's folder is not the study's own."""


def _ours_from_before_ids(study_dir: Path) -> bool:
    """A study folder made before folders were marked: its storage file or its runs are there."""
    return any((study_dir / f).is_file() for f in (DEFAULT_SQLITE, DEFAULT_JOURNAL)) or any(
        study_dir.glob("runs/*/config.yaml")
    )


def refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise StudyFolderError(
            f"--out: {path} is a symbolic link; the sweep writes only into files of its own folder: remove the link"
        )


def check_folder(study_dir: Path) -> None:
    """Refuse a folder that is a link, holds links where the sweep writes, or holds something else's files."""
    refuse_link(study_dir)
    if not study_dir.exists():
        return
    if not study_dir.is_dir():
        raise StudyFolderError(f"--out: {study_dir} is a file, not a study's folder; choose another --out")
    for entry in study_dir.iterdir():  # what the sweep writes, its storage's side files and locks among them
        refuse_link(entry)
    runs = study_dir / "runs"
    if runs.is_dir():
        for run in runs.iterdir():
            refuse_link(run)
    if any(study_dir.iterdir()) and not (study_dir / OWNER).exists() and not _ours_from_before_ids(study_dir):
        raise StudyFolderError(
            f"--out: {study_dir} exists and holds files that are no study's (no {OWNER}); choose another --out, "
            "or move the folder aside"
        )


def find_url(study_dir: Path) -> str | None:
    """The storage of the study in `study_dir` (for `forde report`): the file the launcher left there, else the one
    its study.id names, when that is a SQLite or journal file that exists. A database server named there is not
    contacted on the word of a file: its URL is logged, to pass as --storage."""
    for kind, name in (("sqlite", DEFAULT_SQLITE), ("journal", DEFAULT_JOURNAL)):
        if (study_dir / name).is_file():
            return default_url(study_dir, kind)
    try:
        named = (study_dir / OWNER).read_text().split("\n")[1].strip()
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    for prefix in ("sqlite:///", JOURNAL_PREFIX):
        if named.startswith(prefix) and Path(named[len(prefix) :]).is_file():
            return named
    if named:
        log.warning(
            "%s: the study's storage is %s; pass it as --storage to read the study's trials and draw its figures",
            study_dir,
            named,
        )
    return None


def save_study_file(source: Path, study_dir: Path, name: str) -> None:
    """The study file as it was run, kept in the folder, with its name: launching the copy continues the study
    (a file without `name:` takes its file's name, which the copy's would change)."""
    dest = study_dir / STUDY_FILE
    if dest.exists() and source.resolve() == dest.resolve():
        return
    text = source.read_text()
    raw = yaml.safe_load(text)
    if isinstance(raw, dict) and "name" not in raw:
        named = f"name: {name}  # from the file it was launched from ({source.name})\n{text}"
        try:
            kept = yaml.safe_load(named) == {"name": name, **raw}
        except yaml.YAMLError:
            kept = False
        text = named if kept else yaml.safe_dump({"name": name, **raw}, sort_keys=False)
    write_atomic(dest, text)
