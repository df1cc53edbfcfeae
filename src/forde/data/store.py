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

from forde.data.base import Dataset, Split, image_dataset

META = "meta.json"
FORMAT = 1
SPLITS = ("train", "val", "test")


def is_store(directory: str | Path) -> bool:
    return (Path(directory) / META).is_file()


def save_store(directory: str | Path, splits: dict[str, Split], class_names: list[str]) -> None:
    """Write the splits into `directory`, replacing an earlier store there only once everything is written."""
    directory = Path(directory)
    if directory.exists() and not is_store(directory):
        raise FileExistsError(f"{directory} exists and holds no imported dataset; choose another name or move it away")
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
    directory = Path(directory)
    meta = json.loads((directory / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory} holds format {meta.get('format')}, this version reads {FORMAT}: delete it and "
                         "import (or load) the dataset again")
    splits = {s: Split(torch.from_numpy(np.load(directory / f"{s}_images.npy")),
                       torch.from_numpy(np.load(directory / f"{s}_labels.npy")))
              for s in meta["splits"]}
    return image_dataset(name, splits["train"], splits["test"], meta["class_names"], val=splits.get("val"))
