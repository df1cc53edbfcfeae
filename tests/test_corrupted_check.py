"""Corrupted sets from elsewhere are checked against the test set before the first epoch (and by `forde data
corrupt --check`): one line per problem, naming the file and the fix, and never a number computed on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from forde.cli import main
from forde.config import DataConfig, DataError, load_config
from forde.data.base import Split
from forde.data.corrupted_check import check_corrupted
from forde.data.corrupted_sets import generate_corrupted_set
from forde.data.registry import load_dataset
from forde.data.store import save_store
from forde.run_dir import METRICS, RESULTS
from forde.train import train
from test_datasets import write_tinyimagenet

N_TEST, SIDE = 12, 8


def write_synthetic(root, name="synth"):
    """An imported RGB dataset of 8x8 images: 24 training and 12 test images of 3 classes."""
    rng = np.random.default_rng(0)

    def split(n):
        return Split(torch.from_numpy(rng.integers(0, 256, (n, 3, SIDE, SIDE), dtype=np.uint8)), torch.arange(n) % 3)

    save_store(root / name, {"train": split(24), "test": split(N_TEST)}, ["a", "b", "c"])
    return load_dataset(DataConfig(name=name, root=str(root)))


def place(root, dataset, images=None, labels=None):
    """fog.npy and labels.npy in the CIFAR-10-C layout: the test images (or `images`) at every severity."""
    root.mkdir(parents=True, exist_ok=True)
    test = dataset.full.test
    hwc = test.inputs.permute(0, 2, 3, 1).numpy()
    np.save(root / "fog.npy", np.concatenate([hwc] * 5) if images is None else images)
    np.save(root / "labels.npy", np.tile(test.labels.numpy(), 5).astype(np.uint8) if labels is None else labels)


def config(tmp_path, root, *extra):
    return load_config(
        "quickstart",
        [
            f"data.root={tmp_path / 'data'}",
            "data.name=synth",
            f"run.out_dir={tmp_path / 'runs'}",
            "run.name=run",
            "run.progress=false",
            "optim.epochs=1",
            "ensemble_size=2",
            "model.hidden=[8]",
            "optim.batch_size=8",
            "eval.corruptions=[fog]",
            "eval.generate_corrupted=false",
            f"eval.corrupted_root={root}",
            "eval.grad_samples=0",
            *extra,
        ],
    )


def truncated(root, ds):
    place(root, ds)
    data = (root / "fog.npy").read_bytes()
    (root / "fog.npy").write_bytes(data[: len(data) - 100])


def damaged(images=None, labels=None):
    """`place` with the test images (5N, H, W, C) and labels (5N,) changed by `images(x)` and `labels(y)`."""

    def write(root, ds):
        test = ds.full.test
        x = np.concatenate([test.inputs.permute(0, 2, 3, 1).numpy()] * 5)
        y = np.tile(test.labels.numpy(), 5).astype(np.uint8)
        place(root, ds, images(x) if images else None, labels(y) if labels else None)

    return write


def pickled_objects(root, ds):
    place(root, ds)
    np.save(root / "fog.npy", np.array([None] * 3, dtype=object), allow_pickle=True)


def no_labels(root, ds):
    place(root, ds)
    (root / "labels.npy").unlink()


def bad_part(root, ds):
    place(root, ds)
    (root / "fog.npy").unlink()
    (root / "parts").mkdir()
    np.save(root / "parts" / "fog_s1.npy", np.zeros((N_TEST, SIDE, SIDE, 1), np.uint8))


DEFECTS = {  # what is wrong -> (how to make it, what the line says, which file it names)
    "truncated": (truncated, "is unreadable or cut short", "fog.npy"),
    "channels-first": (
        damaged(images=lambda x: x.transpose(0, 3, 1, 2).copy()),
        "is channels-first (60, 3, 8, 8), but the layout is channels-last",
        "fog.npy",
    ),
    "float pixels": (damaged(images=lambda x: x.astype(np.float32)), "is float32, expected uint8", "fog.npy"),
    "image size": (
        damaged(images=lambda x: np.zeros((len(x), 10, 10, 3), np.uint8)),
        "holds 10x10 images, but the test images are 8x8",
        "fog.npy",
    ),
    "row count": (damaged(images=lambda x: x[:-1]), "has shape (59, 8, 8, 3), expected (60, 8, 8, 3)", "fog.npy"),
    "pickled objects": (pickled_objects, "is unreadable or cut short", "fog.npy"),
    "label count": (damaged(labels=lambda y: y[:-5]), "has 55 labels, expected 60", "labels.npy"),
    "label range": (damaged(labels=lambda y: y + 3), "holds labels 3..5, but the dataset has 3 classes", "labels.npy"),
    "label order": (
        damaged(labels=lambda y: y[::-1].copy()),
        "differ from the test labels in the test set's order",
        "labels.npy",
    ),
    "float labels": (damaged(labels=lambda y: y.astype(np.float64)), "expected integer labels", "labels.npy"),
    "labels missing": (no_labels, "is missing", "labels.npy"),
    "one severity's block": (bad_part, "has shape (12, 8, 8, 1), expected (12, 8, 8, 3)", "parts/fog_s1.npy"),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_defective_set_stops_the_run_before_its_first_epoch(tmp_path, defect):
    write_synthetic(tmp_path / "data")
    root = tmp_path / "synth-C"
    make, says, names = DEFECTS[defect]
    make(root, load_dataset(DataConfig(name="synth", root=str(tmp_path / "data"))))
    with pytest.raises(DataError) as caught:
        train(config(tmp_path, root))
    [line] = str(caught.value).splitlines()
    assert line.startswith(str(root / names)) and says in line
    assert any(fix in line for fix in ("copy it from the release", "convert it once with", "regenerates it"))
    run = tmp_path / "runs" / "run"
    assert not (run / METRICS).exists() and not (run / RESULTS).exists()


@pytest.mark.parametrize("defect", ["channels-first", "truncated", "label order"])
def test_data_corrupt_check_reports_the_same_problems(tmp_path, capsys, defect):
    ds = write_synthetic(tmp_path / "data")
    root = tmp_path / "synth-C"
    make, says, names = DEFECTS[defect]
    make(root, ds)
    args = [
        "data",
        "corrupt",
        "--dataset",
        "synth",
        "--root",
        str(tmp_path / "data"),
        "--corruptions",
        "fog",
        "--check",
        str(root),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"forde: {root / names}") and says in err
    assert not (root / "parts").exists() or defect == "one severity's block"  # nothing generated


def test_a_good_set_passes_and_missing_sets_are_named(tmp_path, capsys):
    ds = write_synthetic(tmp_path / "data")
    root = tmp_path / "synth-C"
    place(root, ds)
    base = ["data", "corrupt", "--dataset", "synth", "--root", str(tmp_path / "data"), "--check", str(root)]
    assert main([*base, "--corruptions", "fog"]) == 0
    assert f"{root}: all 5 sets fit the synth test set (12 images of 8x8, 3 classes)" in capsys.readouterr().out
    assert main([*base, "--corruptions", "fog", "snow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{root} lacks 5 of the 10 sets asked for (snow s1" in err
    results = train(config(tmp_path, root))  # and the run uses it, as an official set
    assert results["summary"]["corrupted/regenerated_sets"] == 0


def test_every_problem_is_one_line(tmp_path):
    ds = write_synthetic(tmp_path / "data")
    root = tmp_path / "synth-C"
    damaged(images=lambda x: x.transpose(0, 3, 1, 2).copy(), labels=lambda y: y + 3)(root, ds)
    truncated_snow = np.concatenate([ds.full.test.inputs.permute(0, 2, 3, 1).numpy()] * 5)
    np.save(root / "snow.npy", truncated_snow[:, :4])
    problems = check_corrupted(root, ds, ["fog", "snow"], [1, 2, 3, 4, 5])
    assert [p.split(" ")[0] for p in problems] == [str(root / f) for f in ("labels.npy", "fog.npy", "snow.npy")]


# ---------------------------------------------------------------------------------------------- folder layout


def tiny_c(tmp_path):
    """Tiny-ImageNet (3 classes, one 64x64 test image each) and its contrast s1 set in the folder layout."""
    write_tinyimagenet(tmp_path / "data", per_class=1)
    ds = load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path / "data")))
    root = tmp_path / "tinyimagenet-C"
    test = ds.full.test
    generate_corrupted_set(
        test.inputs,
        test.labels,
        root,
        corruptions=["contrast"],
        severities=[1],
        layout="folder",
        class_dirs=ds.class_names,
        progress=False,
        workers=1,
    )
    return ds, root, root / "contrast" / "1"


def test_a_folder_set_as_generated_passes(tmp_path):
    ds, root, _ = tiny_c(tmp_path)
    assert check_corrupted(root, ds, ["contrast"], [1]) == []


def cut_short(folder):
    path = next((folder / "n02").iterdir())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def not_an_image(folder):
    path = next((folder / "n01").iterdir())
    path.write_text("no image")
    return path


def other_size(folder):
    for path in (folder / "n03").iterdir():
        Image.new("RGB", (32, 32)).save(path, format="JPEG")
    return folder / "n03"


def class_emptied(folder):
    for path in (folder / "n01").iterdir():
        path.unlink()
    return folder / "n01"


def unknown_class(folder):
    (folder / "n99").mkdir()
    return folder / "n99"


FOLDER_DEFECTS = {
    "cut short": (cut_short, "is not a readable image"),
    "text named .JPEG": (not_an_image, "is not a readable image"),
    "other size": (other_size, "is 32x32, but the test images are 64x64"),
    "class missing": (class_emptied, "holds 0 images, the test set 1 of this class"),
    "unknown class": (unknown_class, "is not a class of the dataset"),
}


@pytest.mark.parametrize("defect", FOLDER_DEFECTS)
def test_folder_layout_defects_are_one_line_naming_the_file(tmp_path, defect):
    ds, root, folder = tiny_c(tmp_path)
    make, says = FOLDER_DEFECTS[defect]
    named = make(folder)
    [line] = check_corrupted(root, ds, ["contrast"], [1])
    assert says in line and str(named) in line and "regenerates it" in line
