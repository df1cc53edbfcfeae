"""CIFAR-10 and CIFAR-100 from the official python-pickle batches; torchvision downloads them on request.

The pickles are read directly (not through torchvision's dataset classes) because those insist on the
release's checksums, which small test files in the same format cannot have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from forde.config import DataConfig, DataError
from forde.data.base import Dataset, Split, image_dataset
from forde.data.imagefolder import missing_data_error
from forde.errors import one_line
from forde.names import is_path_component
from forde.safe_load import UnsafePickleError, pickle_load

RELEASE_NAMES = ("cifar10", "cifar100")


def release_of(name: str):
    """The release's file names, URL and checksum as torchvision knows them (imported here: torchvision takes
    seconds to import, which every process that never reads CIFAR would pay)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    return dict(zip(RELEASE_NAMES, (CIFAR10, CIFAR100)))[name]


def read_batch(path: Path) -> dict:
    """One pickled batch (a dict); latin1 turns the release's Python 2 strings into str. Only plain values
    and NumPy arrays are built while reading (see forde.safe_load)."""
    if not path.is_file():
        raise DataError(
            f"{path} is missing; the CIFAR release has it: download again (data.download=true) or "
            "copy the whole batches folder"
        )
    try:
        batch = pickle_load(path, encoding="latin1")
    except UnsafePickleError as err:
        raise DataError(
            f"{path} was not read: it holds {err.name}, which unpickling would call; the CIFAR release "
            "holds only arrays, lists and strings: replace the file with the release's"
        ) from None
    except Exception as err:  # cut short, or not a pickle at all
        raise DataError(f"{path} is unreadable ({one_line(err)}); replace it with the release's file") from None
    if not isinstance(batch, dict):
        raise DataError(
            f"{path} holds a {type(batch).__name__}, not a CIFAR batch (a dict); replace it with the release's file"
        )
    return batch


def _batch_arrays(path: Path, batch: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """`data` as uint8 [N, 3072] and the (fine) labels as int64 [N], checked against the release's format."""
    labels = batch.get("labels", batch.get("fine_labels"))
    data = batch.get("data")
    fix = "replace it with the release's file"
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {what}, expected uint8 [N, 3072] (32x32 RGB planes); {fix}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.shape != (len(data),):
        raise DataError(f"{path}: expected {len(data)} integer labels under 'labels' (or 'fine_labels'); {fix}")
    if len(labels) and not (0 <= labels.min() and labels.max() < num_classes):
        raise DataError(
            f"{path}: labels range over {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}; {fix}"
        )
    return data, labels


def read_split(folder: Path, files: list[str], num_classes: int) -> Split:
    """Concatenate batches: `data` is uint8 [N, 3072] (R, G, B planes, row-major) -> [N, 3, 32, 32]."""
    arrays = [_batch_arrays(folder / f, read_batch(folder / f), num_classes) for f in files]
    data = np.concatenate([d for d, _ in arrays]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([y for _, y in arrays])
    return Split(torch.from_numpy(data), torch.from_numpy(labels))


def read_class_names(path: Path, key: str) -> list[str]:
    names = read_batch(path).get(key)
    if not (isinstance(names, list) and names and all(is_path_component(n) for n in names)):
        raise DataError(
            f"{path}: '{key}' must be a list of class names, each a plain file name; replace it with the release's file"
        )
    return names


def load_cifar(cfg: DataConfig) -> Dataset:
    release = release_of(cfg.name)
    folder = Path(cfg.root) / release.base_folder
    if not folder.is_dir():
        if not cfg.download:
            raise missing_data_error(cfg.name, folder, cfg.root)
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(release.url, cfg.root, filename=release.filename, md5=release.tgz_md5)
    class_names = read_class_names(folder / release.meta["filename"], release.meta["key"])
    train = read_split(folder, [f for f, _ in release.train_list], len(class_names))
    test = read_split(folder, [f for f, _ in release.test_list], len(class_names))
    return image_dataset(cfg.name, train, test, class_names)
