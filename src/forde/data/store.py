"""The on-disk form of a decoded image dataset: one .npy pair per split plus meta.json, written atomically.

Imported ImageFolder trees and the Tiny-ImageNet cache both use it, so decoding happens once and
every later load is a plain array read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from forde.config import ConfigError, DataError
from forde.data.base import Dataset, Split, image_dataset
from forde.data.images import check_fits_in_memory
from forde.errors import one_line
from forde.names import is_path_component

META = "meta.json"
FORMAT = 1
SPLITS = ("train", "val", "test")


def is_store(directory: str | Path) -> bool:
    return (Path(directory) / META).is_file()


def save_store(directory: str | Path, splits: dict[str, Split], class_names: list[str]) -> None:
    """Write the splits into `directory`, replacing an earlier store there only once everything is written."""
    directory = Path(directory)
    if directory.exists() and not is_store(directory):
        raise ConfigError(f"{directory} exists and holds no imported dataset; choose another name or move it away")
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, data in splits.items():
        np.save(tmp / f"{split}_images.npy", data.inputs.numpy())
        np.save(tmp / f"{split}_labels.npy", data.labels.numpy())
    meta = {"format": FORMAT, "splits": [s for s in SPLITS if s in splits], "class_names": list(class_names)}
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old)
    else:
        tmp.rename(directory)


def load_store(directory: str | Path, name: str) -> Dataset:
    """The dataset in `directory`, its meta.json and arrays checked (NumPy arrays only, no pickles)."""
    directory = Path(directory)
    meta = _read_meta(directory / META)
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{directory} holds format {meta.get('format')}, this version reads {FORMAT}: delete it and "
            "import (or load) the dataset again"
        )
    splits = {s: _read_split(directory, s, len(meta["class_names"])) for s in meta["splits"]}
    return image_dataset(name, splits["train"], splits["test"], meta["class_names"], val=splits.get("val"))


def store_spec(directory: str | Path) -> tuple[tuple[int, ...], int]:
    """(image shape [C, H, W], number of classes) of the store in `directory`, read from meta.json and the training
    images' array header only (the model is checked before any data is read)."""
    directory = Path(directory)
    meta = _read_meta(directory / META)
    path = directory / "train_images.npy"
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError, EOFError) as err:
        raise DataError(
            f"{path} is unreadable ({one_line(err)}); delete {directory} and import (or load) the dataset again"
        ) from None
    return tuple(shape[1:]), len(meta["class_names"])


def _read_meta(path: Path) -> dict:
    fix = f"delete {path.parent} and import (or load) the dataset again"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is unreadable ({one_line(err)}); {fix}") from None
    names, splits = (meta.get("class_names"), meta.get("splits")) if isinstance(meta, dict) else (None, None)
    if not (isinstance(names, list) and names and all(is_path_component(n) for n in names)):
        raise DataError(f"{path}: class_names must be a non-empty list of plain file names; {fix}")
    if not (isinstance(splits, list) and {"train", "test"} <= set(splits) <= set(SPLITS)):
        raise DataError(f"{path}: splits must list train and test (and optionally val); {fix}")
    return meta


def _read_split(directory: Path, split: str, num_classes: int) -> Split:
    """One split's uint8 [N, C, H, W] images and int64 labels in 0..num_classes-1."""
    fix = f"delete {directory} and import (or load) the dataset again"
    arrays = []
    for kind in ("images", "labels"):
        path = directory / f"{split}_{kind}.npy"
        try:
            header = np.load(path, mmap_mode="r", allow_pickle=False)  # the declared shape, nothing read yet
            check_fits_in_memory(
                header.nbytes,
                f"{path} ({header.dtype} {tuple(header.shape)})",
                "train on a subset in a store of its own, or on a machine with more memory",
            )
            arrays.append(np.load(path, allow_pickle=False))
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{path} is unreadable ({one_line(err)}); {fix}") from None
    images, labels = arrays
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(
            f"{directory / f'{split}_images.npy'} is {images.dtype} {images.shape}, expected uint8 "
            f"[N, C, H, W] with C = 1 or 3; {fix}"
        )
    if (
        labels.dtype != np.int64
        or labels.shape != (len(images),)
        or (len(labels) and not (0 <= labels.min() and labels.max() < num_classes))
    ):
        raise DataError(
            f"{directory / f'{split}_labels.npy'} must hold {len(images)} int64 labels in 0..{num_classes - 1}; {fix}"
        )
    return Split(torch.from_numpy(images), torch.from_numpy(labels))
