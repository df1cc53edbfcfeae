"""CIFAR-10 and CIFAR-100 from the official python-pickle batches; torchvision downloads them on request.

The pickles are read directly (not through torchvision's dataset classes) because those insist on the
release's checksums, which small test files in the same format cannot have.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from forde.config import DataConfig
from forde.data.base import Dataset, Split, image_dataset
from forde.data.imagefolder import missing_data_error

RELEASES = {"cifar10": CIFAR10, "cifar100": CIFAR100}  # file names, URL and checksum as torchvision knows them


def read_batch(path: Path) -> dict:
    """One pickled batch (a dict); latin1 turns the release's Python 2 strings into str."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def read_split(folder: Path, files: list[str]) -> Split:
    """Concatenate batches: `data` is uint8 [N, 3072] (R, G, B planes, row-major) -> [N, 3, 32, 32]."""
    entries = [read_batch(folder / f) for f in files]
    data = np.concatenate([np.asarray(e["data"], dtype=np.uint8) for e in entries]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(e["labels"] if "labels" in e else e["fine_labels"], dtype=np.int64)
                             for e in entries])
    return Split(torch.from_numpy(data), torch.from_numpy(labels))


def load_cifar(cfg: DataConfig) -> Dataset:
    release = RELEASES[cfg.name]
    folder = Path(cfg.root) / release.base_folder
    if not folder.is_dir():
        if not cfg.download:
            raise missing_data_error(cfg.name, folder, cfg.root)
        download_and_extract_archive(release.url, cfg.root, filename=release.filename, md5=release.tgz_md5)
    train = read_split(folder, [f for f, _ in release.train_list])
    test = read_split(folder, [f for f, _ in release.test_list])
    class_names = read_batch(folder / release.meta["filename"])[release.meta["key"]]
    return image_dataset(cfg.name, train, test, class_names)
