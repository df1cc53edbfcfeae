"""Malformed and hostile inputs for every loader, through the commands a user runs: each stops with exit code 2
and one error line (no traceback) before any training, and no numbers are printed or written."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from forde.cli import main
from forde.sweep import launch
from test_corrupted_check import DEFECTS as CORRUPTED_DEFECTS
from test_corrupted_check import write_synthetic
from test_datasets import IMPORT_DEFECTS, cut_short, write_cifar10, write_folder, write_tinyimagenet

TRAIN = [
    "run.progress=false",
    "optim.epochs=1",
    "ensemble_size=2",
    "model.hidden=[8]",
    "optim.batch_size=2",
    "eval.corruptions=[none]",
    "eval.grad_samples=0",
]


def train_args(tmp: Path, *extra: str) -> list[str]:
    return ["train", "quickstart", f"data.root={tmp / 'data'}", f"run.out_dir={tmp / 'runs'}", *TRAIN, *extra]


# ---------------------------------------------------------------- ImageFolder import


def import_case(make: Callable[[Path], object]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        write_folder(tmp / "src")
        make(tmp / "src")
        return ["data", "import-folder", str(tmp / "src"), "mine", "--root", str(tmp / "data")]

    return build


def mixed_sizes(src: Path) -> None:
    Image.new("RGB", (9, 9)).save(src / "train" / "alpha" / "10.png")


def bomb_first(src: Path) -> None:
    """A 13000 x 13000 PNG of a few KB (just under Pillow's own bomb limit), first in sorted order."""
    Image.new("L", (13000, 13000)).save(src / "train" / "alpha" / "0-huge.png", optimize=True)


def one_class(src: Path) -> None:
    for split in ("train", "test"):
        for extra in (src / split).iterdir():
            if extra.name != "alpha":
                for f in extra.iterdir():
                    f.unlink()
                extra.rmdir()


IMAGEFOLDER = {
    **{name: import_case(make) for name, (make, _) in IMPORT_DEFECTS.items()},
    "an image over the pixel limit, first in order": import_case(bomb_first),
    "one class only": import_case(one_class),
    "a float image outside [0, 1]": import_case(
        lambda src: Image.fromarray(np.full((5, 7), 3.5, np.float32), "F").save(src / "train" / "alpha" / "f.tif")
    ),
    "an empty image file": import_case(lambda src: (src / "train" / "alpha" / "empty.jpg").write_bytes(b"")),
    "no train folder": import_case(lambda src: (src / "train").rename(src / "training")),
    "images of two sizes": import_case(mixed_sizes),
    "a name that leaves the root": lambda tmp: ["data", "import-folder", str(tmp), "../escape", "--root", str(tmp)],
}


# ---------------------------------------------------------------- CIFAR python batches


def cifar_case(damage: Callable[[Path], object]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        write_cifar10(tmp / "data")
        damage(tmp / "data" / "cifar-10-batches-py")
        return train_args(tmp, "data.name=cifar10")

    return build


def repickle(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        with open(folder / name, "wb") as f:
            pickle.dump(change(batch), f, protocol=2)

    return damage


class Exploit:
    def __reduce__(self):
        return exec, ("open('exploited', 'w').close()",)


CIFAR = {
    "a batch cut short": cifar_case(lambda f: cut_short(f / "data_batch_3")),
    "a batch that is text": cifar_case(lambda f: (f / "test_batch").write_text("not a pickle")),
    "a batch missing": cifar_case(lambda f: (f / "data_batch_5").unlink()),
    "a batch that runs code": cifar_case(repickle("data_batch_1", lambda b: {**b, "labels": Exploit()})),
    "pixels as floats": cifar_case(repickle("data_batch_2", lambda b: {**b, "data": b["data"].astype(np.float32)})),
    "images of another size": cifar_case(repickle("data_batch_2", lambda b: {**b, "data": b["data"][:, :1024]})),
    "fewer labels than images": cifar_case(repickle("test_batch", lambda b: {**b, "labels": b["labels"][:-1]})),
    "a label out of range": cifar_case(repickle("test_batch", lambda b: {**b, "labels": [10] * len(b["labels"])})),
    "a batch that is a list": cifar_case(repickle("data_batch_4", lambda b: [b])),
    "class names that are paths": cifar_case(repickle("batches.meta", lambda b: {**b, "label_names": ["../x"] * 10})),
}


# ---------------------------------------------------------------- Tiny-ImageNet folder


def tiny_case(damage: Callable[[Path], object]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        write_tinyimagenet(tmp / "data")
        damage(tmp / "data" / "tiny-imagenet-200")
        return train_args(tmp, "data.name=tinyimagenet")

    return build


def append_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line)


TINY = {
    "a wnid without training images": tiny_case(lambda f: append_line(f / "wnids.txt", "n04\n")),
    "a wnid that is a path": tiny_case(lambda f: append_line(f / "wnids.txt", "../../n04\n")),
    "a validation image missing": tiny_case(lambda f: (f / "val" / "images" / "val_0.JPEG").unlink()),
    "a validation image named by a path": tiny_case(
        lambda f: append_line(f / "val" / "val_annotations.txt", "../../wnids.txt\tn01\t0\t0\t1\t1\n")
    ),
    "a validation wnid not listed": tiny_case(
        lambda f: append_line(f / "val" / "val_annotations.txt", "val_0.JPEG\tn77\t0\t0\t1\t1\n")
    ),
    "a training image cut short": tiny_case(lambda f: cut_short(f / "train" / "n01" / "images" / "n01_1.JPEG")),
    "a training image of another size": tiny_case(
        lambda f: Image.new("RGB", (32, 32)).save(f / "train" / "n03" / "images" / "n03_0.JPEG")
    ),
    "the validation annotations missing": tiny_case(lambda f: (f / "val" / "val_annotations.txt").unlink()),
}


# ---------------------------------------------------------------- corrupted sets (official npy layout)


def corrupted_case(make: Callable) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        make(tmp / "synth-C", write_synthetic(tmp / "data"))
        return train_args(
            tmp,
            "data.name=synth",
            "eval.corruptions=[fog]",
            "eval.generate_corrupted=false",
            f"eval.corrupted_root={tmp / 'synth-C'}",
        )

    return build


def source_record(text: str) -> Callable:
    def make(root: Path, dataset) -> None:
        CORRUPTED_DEFECTS["label order"][0](root, dataset)  # any set; the record is read first
        (root / "forde-source.json").write_text(text)

    return make


CORRUPTED = {
    **{name: corrupted_case(make) for name, (make, _, _) in CORRUPTED_DEFECTS.items()},
    "a provenance record that is not JSON": corrupted_case(source_record("{'generated':")),
    "a provenance record of another kind": corrupted_case(source_record('{"generated": [1, 2]}')),
}


# ---------------------------------------------------------------- study YAML (the sweep launcher)

LAUGHS = "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
)  # 10^9 values once expanded
STUDY = (
    "name: s\nbase: quickstart\nconfig: {optim: {epochs: 1}, eval: {corruptions: [none]}}\nn_trials: 2\n"
    "objectives: [{metric: test/nll, direction: minimize}]\nsearch_space:\n  method.alpha: {low: 0.0, high: 1.0}\n"
)


def study_case(text: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "study.yaml").write_text(text)
        return ["--study", str(tmp / "study.yaml"), "--out", str(tmp / "studies"), "--no-wandb"]

    return build


def base_file(text: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "base.yaml").write_text(text)
        return study_case(STUDY.replace("base: quickstart", "base: base.yaml"))(tmp)

    return build


STUDIES = {
    "a name that leaves --out": study_case(STUDY.replace("name: s", "name: ../../s")),
    "an absolute name": study_case(STUDY.replace("name: s", "name: /tmp/s")),
    "a YAML syntax error": study_case(STUDY.replace("n_trials: 2", "n_trials: [2")),
    "a YAML tag that would run code": study_case(
        STUDY.replace("n_trials: 2", "n_trials: !!python/object/apply:os.system ['touch exploited']")
    ),
    "a list, not a mapping": study_case("- base: quickstart\n"),
    "an unknown top-level key": study_case(STUDY + "budget: 3\n"),
    "an empty range": study_case(STUDY.replace("low: 0.0, high: 1.0", "low: 1.0, high: 0.0")),
    "an unknown search key": study_case(STUDY.replace("method.alpha", "method.alpah")),
    "no objectives": study_case(STUDY.replace("objectives: [{metric: test/nll, direction: minimize}]\n", "")),
    "n_trials as text": study_case(STUDY.replace("n_trials: 2", "n_trials: many")),
    "a base config that does not exist": study_case(STUDY.replace("base: quickstart", "base: ../nowhere.yaml")),
    "a base file that is one number": base_file("42\n"),
    "a study file that is one number": study_case("42\n"),
    "a list nested 100 deep": study_case(STUDY + "description: " + "[" * 100 + "]" * 100 + "\n"),
    "a base config nested 100 deep": base_file("seed: " + "[" * 100 + "]" * 100 + "\n"),
    "a billion laughs": study_case(STUDY + LAUGHS),
    "a study file of 2 MB": study_case(STUDY + "description: '" + "x" * 2_000_000 + "'\n"),
}


# ---------------------------------------------------------------- config files and overrides


def config_file(text: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        (tmp / "cfg.yaml").write_text(text)
        return ["train", str(tmp / "cfg.yaml"), f"run.out_dir={tmp / 'runs'}", *TRAIN]

    return build


OVERRIDES = {
    "run.name that leaves run.out_dir": lambda tmp: train_args(tmp, "run.name=../../escaped"),
    "data.name that is a path": lambda tmp: train_args(tmp, "data.name=/etc"),
    "a value of the wrong type": lambda tmp: train_args(tmp, "method.alpha=abc"),
    "an unknown key": lambda tmp: train_args(tmp, "optim.learning_rate=0.1"),
    "a value out of range": lambda tmp: train_args(tmp, "optim.lr=-1"),
    "an override without a value": lambda tmp: train_args(tmp, "optim.lr"),
    "an unknown corruption": lambda tmp: train_args(tmp, "eval.corruptions=[rain]"),
    "an unknown dataset": lambda tmp: train_args(tmp, "data.name=mnist"),
    "a YAML tag that would run code": config_file("seed: !!python/object/apply:os.system ['touch exploited']\n"),
    "a config file that is a list": config_file("- 1\n- 2\n"),
    "a config file that is one number": config_file("42\n"),
    "a config file cut mid-line": config_file("optim:\n  lr: [0.1\n"),
    "a config file nested 100 deep": config_file("seed: " + "[" * 100 + "]" * 100 + "\n"),
    "a config file of billion laughs": config_file(LAUGHS),
}


CASES = [
    pytest.param(table, build, id=f"{table}: {name}")
    for table, cases in (
        ("imagefolder", IMAGEFOLDER),
        ("cifar", CIFAR),
        ("tinyimagenet", TINY),
        ("corrupted", CORRUPTED),
        ("study", STUDIES),
        ("config", OVERRIDES),
    )
    for name, build in cases.items()
]


@pytest.mark.parametrize("table, build", CASES)
def test_a_malformed_input_is_one_line_before_any_training(tmp_path, capsys, monkeypatch, table, build):
    monkeypatch.chdir(tmp_path)  # where an exploit would leave its file
    argv = build(tmp_path)
    code = launch.main(argv) if table == "study" else main(argv)
    out, err = capsys.readouterr()
    prefix = "launch.py:" if table == "study" else "forde:"
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "exploited").exists()
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("results.json"))
    assert "accuracy" not in out.lower() and "nll" not in out.lower()  # no numbers
