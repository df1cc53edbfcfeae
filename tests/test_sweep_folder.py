"""The study's folder under --out is the study's own: symbolic links planted in it and folders the launcher did not
make are refused in one line before any storage exists; a study file kept in the folder launches the same study."""

from pathlib import Path

import pytest

from sweep_support import FAST, launch, load

ARGS = ["--no-wandb", *FAST]


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))


def study_dir(tmp_path):
    return tmp_path / "studies" / "quickstart"


def refused(tmp_path, capsys, *args) -> str:
    assert launch(tmp_path, "--n-trials", "1", *ARGS, *args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "name", ["best.md", "study.yaml", "study.id", "study.db", "runs", ".study.db.6034cf017604.lock", "study.db-wal"]
)
def test_a_link_planted_in_a_new_study_folder_is_refused(tmp_path, capsys, name):
    folder = study_dir(tmp_path)
    folder.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.write_text("precious")
    (folder / name).symlink_to(outside)
    err = refused(tmp_path, capsys)
    assert err == (
        f"launch.py: --out: {folder / name} is a symbolic link; the sweep writes only into files of its own folder: "
        "remove the link"
    )
    assert outside.read_text() == "precious" and [p.name for p in folder.iterdir()] == [name]  # no storage made


def test_a_dangling_link_and_a_linked_folder_are_refused(tmp_path, capsys):
    folder = study_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "study.id").symlink_to(tmp_path / "nowhere")
    assert "study.id is a symbolic link" in refused(tmp_path, capsys)
    assert not (tmp_path / "nowhere").exists()
    (folder / "study.id").unlink()
    folder.rmdir()
    (tmp_path / "real").mkdir()
    folder.symlink_to(tmp_path / "real")
    assert f"{folder} is a symbolic link" in refused(tmp_path, capsys)
    assert list((tmp_path / "real").iterdir()) == []


def test_a_run_directory_linked_to_a_foreign_folder_is_refused(tmp_path, capsys):
    assert launch(tmp_path, "--n-trials", "1", *ARGS) == 0
    capsys.readouterr()
    run = study_dir(tmp_path) / "runs" / "trial-0001"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    run.symlink_to(foreign)
    assert f"{run} is a symbolic link" in refused(tmp_path, capsys, "--n-trials", "2")
    assert list(foreign.iterdir()) == [] and len(load(tmp_path).get_trials()) == 1


def test_a_folder_the_launcher_did_not_make_is_left_alone(tmp_path, capsys):
    folder = study_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "best.md").write_text("my own best")
    err = refused(tmp_path, capsys)
    assert err == (
        f"launch.py: --out: {folder} exists and holds files that are no study's (no study.id); choose another "
        "--out, or move the folder aside"
    )
    assert (folder / "best.md").read_text() == "my own best" and sorted(p.name for p in folder.iterdir()) == [
        "best.md",
        "notes.txt",
    ]


def test_the_study_file_kept_in_the_folder_continues_the_study(tmp_path, capsys):
    """quickstart.yaml names no study (its file's name does): the copy in the folder names it, so launching the
    copy (which lies where the launcher writes it) continues the same study."""
    assert launch(tmp_path, "--n-trials", "1", *ARGS) == 0
    kept = study_dir(tmp_path) / "study.yaml"
    assert kept.read_text().startswith("name: quickstart  # from the file it was launched from (quickstart.yaml)")
    assert launch(tmp_path, "--n-trials", "2", *ARGS, study=str(kept)) == 0
    assert len(load(tmp_path).get_trials()) == 2 and not (tmp_path / "studies" / "study").exists()


def test_the_report_finds_a_journal_outside_the_study_folder(tmp_path, caplog):
    """`forde report STUDY`, the command the launcher prints, reads the study's storage wherever the launch put it
    (study.id names it); a database server named there is not contacted, but named in the log."""
    import logging

    from forde.cli import main as cli
    from forde.sweep.folder import find_url

    journal = tmp_path / "shared" / "journal.log"
    assert launch(tmp_path, "--n-trials", "2", "--storage", f"journal:{journal}", *ARGS) == 0
    folder = study_dir(tmp_path)
    assert find_url(folder) == f"journal:{journal}"
    assert cli(["report", str(folder)]) == 0
    assert (folder / "report" / "optuna" / "quickstart" / "history.png").stat().st_size > 0
    (folder / "study.id").write_text("0123\npostgresql://forde@db.example:5432/sweeps\n")
    caplog.set_level(logging.WARNING, logger="forde")
    assert find_url(folder) is None
    assert "the study's storage is postgresql://forde@db.example:5432/sweeps; pass it as --storage" in caplog.text


def test_a_refused_launch_creates_no_storage_and_status_names_the_study_s(tmp_path, capsys):
    """The folder of a journal study, launched without its --storage: refused before a SQLite file is made there
    (which would then hide the study from the report and from --status)."""
    journal = tmp_path / "shared" / "journal.log"
    assert launch(tmp_path, "--n-trials", "1", "--storage", f"journal:{journal}", *ARGS) == 0
    capsys.readouterr()
    err = refused(tmp_path, capsys)
    assert f"continue it with --storage journal:{journal}" in err
    assert not (study_dir(tmp_path) / "study.db").exists()
    assert launch(tmp_path, "--status") == 2
    assert (
        f"its folder names the storage journal:{journal}: pass --storage journal:{journal}" in capsys.readouterr().err
    )
    assert not (study_dir(tmp_path) / "study.db").exists()


def test_new_sqlite_storages_opened_at_once_all_open(tmp_path):
    """Launchers started together on a new SQLite file create Optuna's tables one at a time."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'race' / 'study.db'}"
    opener = f"from forde.sweep.storage import SweepStorage; SweepStorage({url!r}).check()"
    procs = [subprocess.Popen([sys.executable, "-c", opener], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    assert all(p.wait(120) == 0 for p in procs), [p.stderr.read() for p in procs]


def test_a_folder_named_like_a_built_in_study_does_not_hide_it(tmp_path, monkeypatch):
    """Launching from the folder that holds the study's output (`--out .`): the name is still the built-in study."""
    from forde.sweep.options import find_study_file

    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "quick.yaml").write_text("base: quickstart\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick").mkdir()  # the study's own output folder
    assert find_study_file("quick", studies) == studies / "quick.yaml"
    (tmp_path / "mine").write_text("base: quickstart\n")  # a file is taken as given
    assert find_study_file("mine", studies) == Path("mine")


def test_the_dashboard_hint_names_a_sqlite_file_below_the_working_directory_by_its_relative_path(tmp_path, monkeypatch):
    from forde.sweep.launch import dashboard_url
    from forde.sweep.storage import SweepStorage

    monkeypatch.chdir(tmp_path)
    below = SweepStorage(f"sqlite:///{tmp_path / 'studies' / 'q' / 'study.db'}")
    assert dashboard_url(below) == "sqlite:///studies/q/study.db"
    elsewhere = SweepStorage(f"sqlite:///{tmp_path.parent / 'other.db'}")
    assert dashboard_url(elsewhere) == elsewhere.url
    assert dashboard_url(SweepStorage(f"journal:{tmp_path / 'j.log'}")) == str(tmp_path / "j.log")
