"""Names that become paths stay inside the folder they name something in: run, dataset and study names from
the command line or from files, eval's output name, class names read from dataset files, and the dataset
and study names a report turns into folders. Each bad name is refused in one line before anything is written."""

from __future__ import annotations

import argparse
import shutil

import pytest
from omegaconf import OmegaConf

from forde.analysis.report import run as report
from forde.cli import main
from forde.config import ConfigError, load_config
from forde.data.corrupted_sets import generate_corrupted_set
from forde.names import is_path_component
from forde.sweep import launch
from forde.sweep.study import StudyError, read_study
from forde.train import train
from test_corruptions import small_split
from test_train import tiny


@pytest.mark.parametrize(
    "name, ok",
    [
        ("run", True),
        ("seed-0.v2", True),
        ("..x", True),
        ("", False),
        (".", False),
        ("..", False),
        ("../../x", False),
        ("/etc", False),
        ("a/b", False),
        ("a\\b", False),
        ("a\0b", False),
        ("x" * 256, False),
        (3, False),
    ],
)
def test_a_path_component_is_one_entry_of_a_folder(name, ok):
    assert is_path_component(name) is ok


@pytest.mark.parametrize("override", ["run.name=../../x", "run.name=/tmp/x", "data.name=../x", "run.name=.."])
def test_names_that_become_paths_are_refused_before_anything_is_written(tmp_path, capsys, override):
    out = tmp_path / "a" / "b"
    code = main(
        [
            "train",
            "quickstart",
            f"run.out_dir={out}",
            "optim.epochs=1",
            "eval.corruptions=[none]",
            "run.progress=false",
            f"data.root={tmp_path / 'data'}",
            override,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    key = override.split("=")[0]
    assert err.startswith(f"forde: config error: {key} = ") and "must be a single file or folder name" in err
    assert not (tmp_path / "x").exists() and not out.exists() and not (tmp_path / "a").exists()


def test_eval_writes_only_inside_the_run_directory(tmp_path, capsys):
    train(tiny(tmp_path, "optim.epochs=1"))
    assert main(["eval", str(tmp_path / "run"), "--out", "../escaped.json"]) == 2
    assert "--out '../escaped.json' must be a single file or folder name" in capsys.readouterr().err
    assert not (tmp_path / "escaped.json").exists()


def write_study(path, name: str):
    path.write_text(
        f"name: {name}\nbase: quickstart\nconfig: {{optim: {{epochs: 1}}, eval: {{corruptions: [none]}}}}\n"
        "n_trials: 1\nobjectives: [{metric: test/nll, direction: minimize}]\n"
    )
    return path


def test_a_study_name_is_one_folder_name(tmp_path):
    with pytest.raises(StudyError, match=r"name = '\.\./\.\./x' must be a single file or folder name"):
        read_study(write_study(tmp_path / "s.yaml", "../../x"))
    assert read_study(write_study(tmp_path / "s.yaml", "fine")).name == "fine"


def test_the_launcher_writes_nothing_outside_out_for_a_study_named_to_escape(tmp_path, capsys):
    (tmp_path / "here" / "deep").mkdir(parents=True)
    study = write_study(tmp_path / "here" / "escape.yaml", "../../x")
    code = launch.main(["--study", str(study), "--out", str(tmp_path / "here" / "deep" / "studies"), "--no-wandb"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines()[-1].startswith("launch.py: study ") and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == ["deep", "escape.yaml"]  # no x/study.db
    assert not any((tmp_path / "here" / "deep").iterdir())


def test_class_names_from_dataset_files_never_become_paths_outside_the_set(tmp_path):
    images, labels = small_split()
    with pytest.raises(ValueError, match=r"class dir or file name '\.\./\.\./escaped'"):
        generate_corrupted_set(
            images,
            labels,
            tmp_path / "out",
            layout="folder",
            class_dirs=("a", "../../escaped", "c"),
            corruptions=["contrast"],
            severities=[1],
            progress=False,
            workers=1,
        )
    assert not (tmp_path / "escaped").exists()


def test_a_report_skips_runs_whose_names_would_leave_its_folder(tmp_path, caplog):
    train(tiny(tmp_path / "study" / "runs", "optim.epochs=1", name="good"))
    bad = tmp_path / "study" / "runs" / "bad"
    shutil.copytree(tmp_path / "study" / "runs" / "good", bad)
    config = OmegaConf.load(bad / "config.yaml")
    config.data.name = "../../../escaped"
    OmegaConf.save(config, bad / "config.yaml")
    out = tmp_path / "study" / "report"
    report(
        argparse.Namespace(
            study_dir=tmp_path / "study", out=out, paper=False, storage=None, study_name=None, wandb=None
        )
    )
    assert f"skipping {bad}: its dataset and model name '../../../escaped-mlp-M3'" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"] and (out / "digits-mlp-M3" / "benchmark.md").exists()
    assert not list(tmp_path.rglob("escaped*"))


def test_config_validation_still_accepts_default_and_sweep_names(tmp_path):
    assert load_config("quickstart", ["run.name=trial-0007"]).run.name == "trial-0007"
    assert load_config("quickstart").run.name is None
    with pytest.raises(ConfigError, match="data.name"):
        load_config("quickstart", ["data.name=.."])
