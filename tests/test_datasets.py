"""Loaders read small files written here in each official layout; nothing is downloaded."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.utils
from PIL import Image

from forde.cli import main
from forde.config import ConfigError, DataConfig
from forde.data import cifar, images, registry, tinyimagenet
from forde.data.base import Split, channel_stats, split_train_val
from forde.data.imagefolder import import_folder
from forde.data.registry import input_spec, load_dataset

# ---------------------------------------------------------------- writers of the official layouts


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 3) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    rows, labels = [], []
    for b, fname in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data, y = _cifar_rows(per_batch, b), [(b + i) % 10 for i in range(per_batch)]
        _pickle(
            folder / fname,
            {
                "batch_label": fname,
                "labels": y,
                "data": data,
                "filenames": [f"{fname}_{i}.png" for i in range(per_batch)],
            },
        )
        rows.append(data)
        labels.append(y)
    return {"train": (np.concatenate(rows[:5]), sum(labels[:5], [])), "test": (rows[5], labels[5]), "names": names}


def write_cifar100(root: Path, n: int = 4) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"fine{i:02d}" for i in range(100)]
    _pickle(folder / "meta", {"fine_label_names": fine, "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    out = {"names": fine}
    for s, split in enumerate(("train", "test")):
        data, y = _cifar_rows(n, 10 + s), [(97 - 7 * i - s) % 100 for i in range(n)]
        _pickle(
            folder / split,
            {
                "filenames": [f"{i}.png" for i in range(n)],
                "batch_label": split,
                "fine_labels": y,
                "coarse_labels": [v // 5 for v in y],
                "data": data,
            },
        )
        out[split] = (data, y)
    return out


def _solid(color, size=(64, 64), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def write_tinyimagenet(root: Path, per_class: int = 2) -> dict:
    """Three wnids (listed unsorted); each image is one solid colour that encodes (label, index)."""
    folder = root / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n01\tone\nn02\ttwo\nn03\tthree\n")
    for label, w in enumerate(sorted(wnids)):
        img_dir = folder / "train" / w / "images"
        img_dir.mkdir(parents=True)
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(per_class):
            _solid((40 * label, 100 + 60 * k, 0)).save(img_dir / f"{w}_{k}.JPEG")
    _solid(128, mode="L").save(folder / "train" / "n02" / "images" / "n02_9.JPEG")  # a grey JPEG, as in the release
    annotations = [("val_1.JPEG", "n03"), ("val_0.JPEG", "n02"), ("val_2.JPEG", "n01")]
    for fname, w in annotations:
        _solid((40 * sorted(wnids).index(w), 0, 200)).save(folder / "val" / "images" / fname)
    (folder / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in annotations))
    return {"wnids": sorted(wnids)}


def write_folder(src: Path, sizes=None, ext="png", with_val=False) -> dict:
    """An ImageFolder tree of random images; returns the expected arrays in the import's order."""
    rng = np.random.default_rng(0)
    classes = ["beta", "alpha"]  # imported in sorted order: alpha=0, beta=1
    files = ["10", "2", "x"]  # sorted as strings: "10" < "2" < "x"
    expected = {}
    for split in ("train", "test") + (("val",) if with_val else ()):
        arrays, labels = [], []
        for label, cls in enumerate(sorted(classes)):
            (src / split / cls).mkdir(parents=True)
            (src / split / cls / "notes.txt").write_text("not an image")
            for name in sorted(files):
                h, w = (sizes or {}).get((split, cls, name), (5, 7))
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(a).save(src / split / cls / f"{name}.{ext}")
                arrays.append(a.transpose(2, 0, 1))
                labels.append(label)
        expected[split] = (arrays, labels)
    return expected


# ---------------------------------------------------------------- CIFAR


def test_cifar10_reads_python_batches(tmp_path):
    truth = write_cifar10(tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.class_names == tuple(truth["names"])
    assert ds.train.inputs.shape == (15, 3, 32, 32) and ds.train.inputs.dtype == torch.uint8
    assert ds.test.inputs.shape == (3, 3, 32, 32) and ds.train.labels.dtype == torch.int64
    data, labels = truth["train"]
    assert ds.train.labels.tolist() == labels
    # row-major R, G, B planes: pixel (r, c) of channel k sits at k*1024 + r*32 + c
    assert ds.train.inputs[4, 1, 2, 5].item() == data[4, 1024 + 2 * 32 + 5]
    assert torch.equal(ds.train.inputs.reshape(15, -1), torch.from_numpy(data))
    assert torch.equal(ds.test.inputs.reshape(3, -1), torch.from_numpy(truth["test"][0]))
    assert ds.mean == pytest.approx(channel_stats(ds.train.inputs)[0]) and ds.val is None


def test_cifar100_reads_fine_labels(tmp_path):
    truth = write_cifar100(tmp_path)
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path)))
    assert ds.num_classes == 100 and ds.class_names[:2] == ("fine00", "fine01")
    assert ds.train.labels.tolist() == truth["train"][1] and ds.test.labels.tolist() == truth["test"][1]
    assert torch.equal(ds.test.inputs.reshape(4, -1), torch.from_numpy(truth["test"][0]))


def test_cifar_download_goes_through_torchvision_release(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        write_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    assert len(ds.train) == 15
    release = cifar.release_of("cifar10")
    assert calls == [(release.url, "cifar-10-python.tar.gz", release.tgz_md5)]


@pytest.mark.parametrize(
    "name, release",
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("tinyimagenet", "tiny-imagenet-200")],
)
def test_missing_dataset_names_path_and_fixes(tmp_path, name, release):
    with pytest.raises(ConfigError) as err:
        load_dataset(DataConfig(name=name, root=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path / release) in msg and str(tmp_path / name) in msg
    assert "data.download=true" in msg and f"forde data import-folder SRC {name}" in msg


def test_unknown_name_lists_builtin_and_imported(tmp_path):
    write_folder(tmp_path / "src")
    import_folder(tmp_path / "src", "mine", tmp_path / "data")
    with pytest.raises(
        ConfigError, match=r"built in: cifar10, cifar100, digits, tinyimagenet; imported under .*: mine"
    ):
        load_dataset(DataConfig(name="nope", root=str(tmp_path / "data")))


# ---------------------------------------------------------------- Tiny-ImageNet


def test_tinyimagenet_layout_order_grey_and_cache(tmp_path, monkeypatch):
    truth = write_tinyimagenet(tmp_path)
    ds = load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path)))
    assert ds.class_names == tuple(truth["wnids"]) and ds.num_classes == 3
    assert ds.train.inputs.shape == (7, 3, 64, 64) and ds.train.inputs.dtype == torch.uint8
    assert ds.train.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]  # sorted wnids, sorted files within (n02_9 last)
    red = ds.train.inputs[:, 0].float().mean((1, 2))
    assert torch.allclose(red[[0, 2, 5]], torch.tensor([0.0, 40.0, 80.0]), atol=3)
    grey = ds.train.inputs[4].float()
    assert torch.allclose(grey, torch.full_like(grey, 128.0), atol=2)  # grey JPEG -> RGB
    assert ds.test.labels.tolist() == [1, 2, 0]  # val_0 (n02), val_1 (n03), val_2 (n01)
    assert torch.allclose(ds.test.inputs[:, 0].float().mean((1, 2)), torch.tensor([40.0, 80.0, 0.0]), atol=3)

    cache = tmp_path / "tiny-imagenet-200" / tinyimagenet.CACHE
    assert (cache / "meta.json").is_file()
    monkeypatch.setattr(tinyimagenet, "decode_splits", lambda *a, **k: pytest.fail("decoded again"))
    again = load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path)))
    assert torch.equal(again.train.inputs, ds.train.inputs) and torch.equal(again.test.labels, ds.test.labels)


def test_tinyimagenet_download_uses_release_url(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, md5):
        calls.append((url, md5))
        write_tinyimagenet(Path(root))

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    ds = load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path), download=True))
    assert len(ds.train) == 7 and calls == [(tinyimagenet.URL, tinyimagenet.MD5)]


# ---------------------------------------------------------------- ImageFolder import


def test_import_folder_png_round_trip_and_load_by_name(tmp_path):
    expected = write_folder(tmp_path / "src")
    dest = import_folder(tmp_path / "src", "mine", tmp_path / "data")
    assert dest == tmp_path / "data" / "mine"
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]  # no temporary folders left
    ds = load_dataset(DataConfig(name="mine", root=str(tmp_path / "data")))
    assert ds.class_names == ("alpha", "beta") and ds.num_classes == 2 and ds.val is None
    for split in (ds.train, ds.test):
        assert split.inputs.shape == (6, 3, 5, 7) and split.inputs.dtype == torch.uint8
    for got, (arrays, labels) in ((ds.train, expected["train"]), (ds.test, expected["test"])):
        assert torch.equal(got.inputs, torch.from_numpy(np.stack(arrays)))  # PNG: bit-exact, H and W kept apart
        assert got.labels.tolist() == labels == [0, 0, 0, 1, 1, 1]


def test_import_folder_jpeg_and_own_val_split(tmp_path):
    write_folder(tmp_path / "src", ext="jpg", with_val=True)
    import_folder(tmp_path / "src", "jpegs", tmp_path)
    ds = load_dataset(DataConfig(name="jpegs", root=str(tmp_path)))
    assert ds.train.inputs.shape == ds.val.inputs.shape == ds.test.inputs.shape == (6, 3, 5, 7)
    assert ds.val.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ConfigError, match="has its own validation split"):
        load_dataset(DataConfig(name="jpegs", root=str(tmp_path), val_fraction=0.1))


def test_import_folder_reimport_replaces(tmp_path):
    write_folder(tmp_path / "a")
    import_folder(tmp_path / "a", "mine", tmp_path / "data")
    write_folder(
        tmp_path / "b",
        sizes={(s, c, f): (9, 9) for s in ("train", "test") for c in ("alpha", "beta") for f in ("10", "2", "x")},
    )
    import_folder(tmp_path / "b", "mine", tmp_path / "data")
    assert load_dataset(DataConfig(name="mine", root=str(tmp_path / "data"))).input_shape == (3, 9, 9)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["mine"]


def test_import_folder_mixed_sizes_fail_clearly(tmp_path):
    write_folder(tmp_path / "src", sizes={("test", "beta", "x"): (6, 7)})
    with pytest.raises(
        ValueError, match=r"all images must share one size.*beta/x\.png is 7x6 while .*alpha/10\.png is 7x5"
    ):
        import_folder(tmp_path / "src", "mixed", tmp_path / "data")
    assert not (tmp_path / "data" / "mixed").exists()


def test_import_folder_layout_errors(tmp_path):
    write_folder(tmp_path / "src")
    with pytest.raises(ValueError, match="dataset name"):
        import_folder(tmp_path / "src", "../up", tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        import_folder(tmp_path / "src" / "train", "x", tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()  # never replaced: it is not an imported dataset
    with pytest.raises(ConfigError, match="holds no imported dataset"):
        import_folder(tmp_path / "src", "cifar-10-batches-py", tmp_path)
    (tmp_path / "src" / "test" / "gamma").mkdir()
    with pytest.raises(ValueError, match="class 'gamma' has no folder in the train split"):
        import_folder(tmp_path / "src", "x", tmp_path)


def cut_short(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


IMPORT_DEFECTS = {  # what is wrong -> (how to make it in a tree of write_folder, what the one line says)
    "a truncated image": (lambda src: cut_short(src / "train" / "beta" / "2.png"), "is not a readable image"),
    "a text file named .png": (
        lambda src: (src / "test" / "alpha" / "x.png").write_text("hello") and src / "test" / "alpha" / "x.png",
        "is not a readable image",
    ),
    "a test class missing from train": (
        lambda src: (src / "test" / "gamma").mkdir() or src / "test" / "gamma",
        "class 'gamma' has no folder in the train split",
    ),
    "an empty class folder": (
        lambda src: (src / "train" / "gamma").mkdir() or src / "train" / "gamma",
        "holds no images",
    ),
}


@pytest.mark.parametrize("defect", IMPORT_DEFECTS)
def test_import_folder_problems_are_one_line_naming_the_file_or_folder(tmp_path, capsys, defect):
    write_folder(tmp_path / "src")
    make, says = IMPORT_DEFECTS[defect]
    named = make(tmp_path / "src")
    assert main(["data", "import-folder", str(tmp_path / "src"), "mine", "--root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("forde:")]
    assert "Traceback" not in err and line.startswith(f"forde: {named}") and says in line
    assert not (tmp_path / "data" / "mine").exists()


def test_an_empty_class_is_imported_only_when_asked_for(tmp_path, capsys, caplog):
    write_folder(tmp_path / "src")
    (tmp_path / "src" / "train" / "gamma").mkdir()
    args = ["data", "import-folder", str(tmp_path / "src"), "mine", "--root", str(tmp_path / "data")]
    assert main(args) == 2
    assert "pass --allow-empty-classes" in capsys.readouterr().err
    assert main([*args, "--allow-empty-classes"]) == 0
    assert f"{tmp_path / 'src' / 'train' / 'gamma'} holds no images; its class is kept" in caplog.text
    ds = load_dataset(DataConfig(name="mine", root=str(tmp_path / "data")))
    assert ds.class_names == ("alpha", "beta", "gamma") and ds.num_classes == 3 and len(ds.train) == 6


def test_imported_cifar10_wins_over_python_batches(tmp_path):
    write_cifar10(tmp_path)
    write_folder(tmp_path / "src")
    import_folder(tmp_path / "src", "cifar10", tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert ds.class_names == ("alpha", "beta") and ds.input_shape == (3, 5, 7)


# ---------------------------------------------------------------- validation split and statistics


@pytest.fixture(params=["digits", "cifar10", "cifar100", "tinyimagenet", "imported"])
def any_source(request, tmp_path) -> DataConfig:
    """One DataConfig per loader path."""
    name = request.param
    if name == "cifar10":
        write_cifar10(tmp_path, per_batch=8)
    elif name == "cifar100":
        write_cifar100(tmp_path, n=40)
    elif name == "tinyimagenet":
        write_tinyimagenet(tmp_path, per_class=13)
    elif name == "imported":
        write_folder(tmp_path / "src")
        import_folder(tmp_path / "src", name, tmp_path)
    return DataConfig(name=name, root=str(tmp_path), split_seed=3)


def test_every_loader_holds_out_a_seeded_validation_split(any_source):
    full = load_dataset(any_source)
    any_source.val_fraction = 0.25
    a, b = load_dataset(any_source), load_dataset(any_source)
    n = len(full.train)
    assert len(a.val) == round(n * 0.25) and len(a.train) + len(a.val) == n
    assert torch.equal(a.val.inputs, b.val.inputs) and torch.equal(a.train.labels, b.train.labels)

    # disjoint, and together the training set: match samples back to their index in the full set
    def key(s):
        return [bytes(x.numpy().tobytes()) + bytes([y]) for x, y in zip(s.inputs, s.labels.to(torch.uint8))]

    assert sorted(key(a.train) + key(a.val)) == sorted(key(full.train))
    assert a.mean == full.mean  # normalisation comes from the whole training set, whatever the split


def test_split_train_val_seed_sizes_disjoint():
    split = Split(torch.zeros(100, 1), torch.arange(100))
    train, val = split_train_val(split, 0.1, seed=7)
    again_train, again_val = split_train_val(split, 0.1, seed=7)
    other_train, other_val = split_train_val(split, 0.1, seed=8)
    assert len(val) == 10 and len(train) == 90
    assert torch.equal(val.labels, again_val.labels) and not torch.equal(val.labels, other_val.labels)
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(100))
    assert train.labels.tolist() == sorted(train.labels.tolist())  # original order kept within each part
    assert split_train_val(split, 0.0, seed=7) == (split, None)


def test_channel_stats_match_float64_formula():
    x = torch.randint(0, 256, (37, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(x, chunk=8)
    f = x.double() / 255
    assert mean == pytest.approx(f.mean((0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(f.std((0, 2, 3)).tolist(), abs=1e-12)


def test_decode_images_rejects_empty():
    with pytest.raises(ValueError, match="no images"):
        images.decode_images([])


def test_input_spec_is_what_the_loader_reads_without_reading_it(any_source, monkeypatch):
    """The shape and classes a model is checked against before the data is read (for an imported folder: its
    meta.json and array header). The Tiny-ImageNet files written here have 3 classes, the release 200."""
    loaded = load_dataset(any_source)
    monkeypatch.setattr(registry, "LOADERS", {})  # no loader is called, an imported folder's arrays are not read
    monkeypatch.setattr(registry, "load_imported", lambda *a: pytest.fail("read the data"))
    shape, classes = input_spec(any_source)
    assert shape == loaded.input_shape
    assert classes == (200 if any_source.name == "tinyimagenet" else loaded.num_classes)


def test_input_spec_of_an_unknown_dataset_is_the_loaders_error(tmp_path):
    with pytest.raises(ConfigError, match="'nothing': unknown dataset"):
        input_spec(DataConfig(name="nothing", root=str(tmp_path)))


def test_the_bundled_digits_cannot_be_shadowed_by_an_import(tmp_path):
    from forde.data.imagefolder import import_folder

    with pytest.raises(ConfigError, match="dataset name 'digits'"):
        import_folder(tmp_path / "src", "digits", tmp_path / "root")


def test_the_digits_are_read_as_scikit_learn_reads_them():
    """The quickstart reads scikit-learn's digits file without importing scikit-learn; the file must be where the
    installed release keeps it, and its arrays exactly `load_digits()`'s."""
    from sklearn.datasets import load_digits as sk_digits

    from forde.data import toy

    assert toy.digits_file() is not None, "scikit-learn moved its digits file: update forde.data.toy.digits_file"
    images, labels = toy.digits_arrays()
    bunch = sk_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
