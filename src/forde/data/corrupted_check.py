"""Checks of corrupted test sets on disk against the test set they corrupt, before any training.

A -C set from elsewhere (the official release, a copy, a conversion) that is cut short, of another image
size, in another array order or with other labels either crashes the final evaluation hours into a run
or, worse, gives wrong numbers without a word (channels-first arrays read as channels-last). Each set a
run will use is checked here first; every problem is one line that names the file and the fix.

What each layout promises (see forde.data.corrupted_sets):
- npy (CIFAR-10-C / CIFAR-100-C): `<name>.npy` uint8 (5N, H, W, C), or one severity's block
  `parts/<name>_s<k>.npy` (N, H, W, C); `labels.npy` holds the test labels, in the test set's order,
  repeated for the 5 severities (any integer type; the release's is uint8).
- folder (Tiny-ImageNet-C): `<name>/<severity>/<class>/<image>`, one folder per class of the dataset
  (named as its classes; the label is the class folder's position in sorted order), as many images
  per class as the test set has, each readable and of the test images' size. The release's images
  are not the test images themselves, so their order promises nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from forde.data.base import Dataset
from forde.data.corrupted_sets import LABELS_FILE, part_path
from forde.data.corruption_names import SEVERITIES
from forde.errors import one_line

CHANNELS_FIRST_FIX = "np.save(path, np.load(path).transpose(0, 2, 3, 1))"


class Expected:
    """What the test set says every corrupted set must look like."""

    def __init__(self, dataset: Dataset, root: Path):
        test = dataset.full.test
        self.n, self.channels, self.height, self.width = test.inputs.shape
        self.labels = test.labels.numpy()
        self.num_classes = dataset.num_classes
        self.class_dirs = tuple(dataset.class_names) or tuple(str(c) for c in range(self.num_classes))
        self.class_counts = Counter(self.labels.tolist())
        self.regenerate = f"`forde data corrupt --dataset {dataset.name} --out {root}` regenerates it"


def check_corrupted(root: str | Path, dataset: Dataset, names: Iterable[str], severities: Iterable[int]) -> list[str]:
    """One line per problem of the sets of `names` x `severities` present under `root` (absent sets are
    not problems here: they are generated, or reported as missing)."""
    root, expected = Path(root), Expected(dataset, Path(root))
    problems: list[str] = []
    npy_sets = [
        n for n in names if (root / f"{n}.npy").is_file() or any(part_path(root, n, s).is_file() for s in severities)
    ]
    if npy_sets:
        problems += _check_labels(root / LABELS_FILE, expected)
    for name in names:
        if (root / f"{name}.npy").is_file():
            problems += _check_array(root / f"{name}.npy", len(SEVERITIES) * expected.n, expected)
            continue
        for severity in severities:
            part, folder = part_path(root, name, severity), root / name / str(severity)
            if part.is_file():
                problems += _check_array(part, expected.n, expected)
            elif folder.is_dir():
                problems += _check_folder(folder, expected)
    return problems


def _load(path: Path) -> tuple[np.ndarray | None, str | None]:
    """The array through a memory map (only its header is read; a file shorter than its header says is an
    error here), or the reason it cannot be read."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False), None
    except (OSError, ValueError, EOFError) as err:
        return None, one_line(err)


def _check_labels(path: Path, e: Expected) -> list[str]:
    if not path.is_file():
        return [
            f"{path} is missing: the npy layout needs the labels beside the arrays; copy it from the release, "
            f"or {e.regenerate}"
        ]
    labels, why = _load(path)
    fix = f"copy it from the release again, or {e.regenerate}"
    if labels is None:
        return [f"{path} is unreadable or cut short ({why}); {fix}"]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return [
            f"{path} is {labels.dtype} {labels.shape}, expected integer labels of shape "
            f"({len(SEVERITIES) * e.n},); {fix}"
        ]
    if len(labels) != len(SEVERITIES) * e.n:
        return [
            f"{path} has {len(labels)} labels, expected {len(SEVERITIES) * e.n} (the {e.n} test labels for each of "
            f"the {len(SEVERITIES)} severities): it belongs to another test set or is incomplete; {fix}"
        ]
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= e.num_classes:
        return [
            f"{path} holds labels {low}..{high}, but the dataset has {e.num_classes} classes "
            f"(0..{e.num_classes - 1}): it belongs to another dataset; {fix}"
        ]
    blocks = np.asarray(labels).reshape(len(SEVERITIES), e.n)
    wrong = [s for s, block in zip(SEVERITIES, blocks) if not np.array_equal(block, e.labels)]
    if wrong:
        return [
            f"{path}: the labels of severity {wrong[0]} differ from the test labels in the test set's order, "
            f"which the npy layout promises (rows in test-set order): it belongs to another test set; {fix}"
        ]
    return []


def _check_array(path: Path, rows: int, e: Expected) -> list[str]:
    images, why = _load(path)
    fix = f"copy it from the release again, or delete it and {e.regenerate}"
    if images is None:
        return [f"{path} is unreadable or cut short ({why}); {fix}"]
    want = (rows, e.height, e.width, e.channels)
    if images.shape == want and images.dtype == np.uint8:
        return []
    if images.ndim == 4 and images.shape == (rows, e.channels, e.height, e.width):
        return [
            f"{path} is channels-first {images.shape}, but the layout is channels-last (N, H, W, C) = {want}: "
            f"read as it is, every image would be scrambled; convert it once with {CHANNELS_FIRST_FIX}"
        ]
    if images.dtype != np.uint8:
        return [f"{path} is {images.dtype}, expected uint8 pixels 0..255 of shape {want}; {fix}"]
    if images.ndim == 4 and images.shape[0] == rows and images.shape[1:3] != (e.height, e.width):
        return [
            f"{path} holds {images.shape[1]}x{images.shape[2]} images, but the test images are "
            f"{e.height}x{e.width}: it belongs to another dataset; {fix}"
        ]
    return [
        f"{path} has shape {images.shape}, expected {want} (the {e.n} test images"
        f"{' at each of the 5 severities' if rows != e.n else ''}, H, W, C); {fix}"
    ]


def _check_folder(folder: Path, e: Expected) -> list[str]:
    fix = f"extract the set from the release again, or delete {folder} and {e.regenerate}"
    present = sorted(d.name for d in folder.iterdir() if d.is_dir())
    unknown = sorted(set(present) - set(e.class_dirs))
    if unknown:
        return [f"{folder / unknown[0]} is not a class of the dataset ({len(unknown)} such folder(s)); {fix}"]
    if list(e.class_dirs) != sorted(e.class_dirs):
        return [
            f"{folder}: the dataset's class names are not in sorted order, so the folder layout (label = sorted "
            "position) cannot label them; use the npy layout for this dataset"
        ]
    files = {c: sorted(p for p in (folder / c).iterdir() if p.is_file()) for c in present}
    for label, cls in enumerate(e.class_dirs):
        have, want = len(files.get(cls, [])), e.class_counts.get(label, 0)
        if have != want:
            return [
                f"{folder / cls} holds {have} images, the test set {want} of this class: the set is incomplete "
                f"or of another test set; {fix}"
            ]
    paths = [p for c in present for p in files[c]]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        bad = [line for line in pool.map(lambda p: _check_image(p, e), paths, chunksize=64) if line]
    if bad:
        return [f"{bad[0]}{f' (and {len(bad) - 1} more images in {folder})' if len(bad) > 1 else ''}; {fix}"]
    return []


def _check_image(path: Path, e: Expected) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
            size = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{path} is not a readable image ({one_line(err)})"
    if size != (e.width, e.height):
        return f"{path} is {size[0]}x{size[1]}, but the test images are {e.width}x{e.height}"
    return None
