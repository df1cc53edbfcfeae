"""Loading -C sets written by hand in the official layouts (as released), not through the generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from forde.data.corrupted_loader import corrupted_set_exists, load_corrupted, missing_corrupted

N, SIDE = 4, 8


def write_cifar_c(root, names=("fog", "snow")):
    """CIFAR-10-C layout: <name>.npy (5N, H, W, 3) uint8, pixel value = 10 * severity + row in block; labels.npy."""
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        rows = [np.full((SIDE, SIDE, 3), 10 * s + i + k, np.uint8) for s in range(1, 6) for i in range(N)]
        np.save(root / f"{name}.npy", np.stack(rows))
    labels = np.array([3, 1, 4, 1], np.uint8)
    np.save(root / "labels.npy", np.tile(labels, 5))
    return labels


def write_tiny_c(root, name="fog", severity=2):
    """Tiny-ImageNet-C layout: <name>/<severity>/<wnid>/<file>.JPEG; flat colours survive JPEG."""
    colours = {
        ("n09", "val_7.JPEG"): 40,
        ("n01", "val_9.JPEG"): 80,
        ("n01", "val_2.JPEG"): 120,
        ("n05", "val_1.JPEG"): 160,
    }
    for (wnid, file), value in colours.items():  # written in no particular order
        folder = root / name / str(severity) / wnid
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((SIDE, SIDE, 3), value, np.uint8)).save(folder / file, quality=85, optimize=True)


def test_npy_layout_severity_block(tmp_path):
    labels = write_cifar_c(tmp_path)
    for severity in (1, 3, 5):
        split = load_corrupted(tmp_path, "fog", severity)
        assert split.inputs.shape == (N, 3, SIDE, SIDE) and split.inputs.dtype == torch.uint8
        assert split.inputs.is_contiguous()
        assert split.inputs[:, 0, 0, 0].tolist() == [10 * severity + i for i in range(N)]  # file order
        assert split.labels.dtype == torch.int64 and split.labels.tolist() == labels.tolist()
    assert load_corrupted(tmp_path, "snow", 2).inputs[0, 0, 0, 0] == 21


def test_folder_layout_imagefolder_order(tmp_path):
    write_tiny_c(tmp_path)
    split = load_corrupted(tmp_path, "fog", 2)
    assert split.inputs.shape == (4, 3, SIDE, SIDE) and split.inputs.dtype == torch.uint8
    assert split.labels.tolist() == [0, 0, 1, 2]  # n01, n01, n05, n09
    means = split.inputs.float().mean(dim=(1, 2, 3)).round().tolist()
    assert means == [120, 80, 160, 40]  # n01/val_2, n01/val_9, n05/val_1, n09/val_7


def test_explicit_layout_and_errors_name_the_expected_paths(tmp_path):
    write_cifar_c(tmp_path / "c10")
    write_tiny_c(tmp_path / "tiny")
    assert load_corrupted(tmp_path / "c10", "fog", 1, layout="npy").inputs.shape[0] == N
    assert load_corrupted(tmp_path / "tiny", "fog", 2, layout="folder").inputs.shape[0] == 4
    with pytest.raises(FileNotFoundError, match=r"frost\.npy"):
        load_corrupted(tmp_path / "c10", "frost", 1)
    with pytest.raises(FileNotFoundError, match=r"fog/3"):
        load_corrupted(tmp_path / "tiny", "fog", 3)
    (tmp_path / "c10" / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels\.npy"):
        load_corrupted(tmp_path / "c10", "fog", 1)
    with pytest.raises(ValueError, match="unknown"):
        load_corrupted(tmp_path / "c10", "rain", 1)


def test_what_is_missing(tmp_path):
    write_cifar_c(tmp_path / "c10")
    write_tiny_c(tmp_path / "tiny")
    assert corrupted_set_exists(tmp_path / "c10", ["fog", "snow"])
    assert missing_corrupted(tmp_path / "c10", ["snow", "frost"], [1]) == [("frost", 1)]
    assert missing_corrupted(tmp_path / "tiny", ["fog"]) == [("fog", s) for s in (1, 3, 4, 5)]
    assert not corrupted_set_exists(tmp_path / "nowhere")
