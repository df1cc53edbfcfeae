"""Datasets that need no download: scikit-learn's bundled 8x8 digits (the quickstart)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from forde.data.base import Dataset, Split, image_dataset

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 1234  # fixed so every run sees the same test set


def digits_file() -> Path | None:
    """The digits as scikit-learn ships them (`datasets/data/digits.csv.gz`: 64 pixels and the label per row),
    found without importing scikit-learn, which takes seconds that every quickstart process would pay; None where
    a release keeps them elsewhere (tests/test_datasets.py fails then, so the slower path is never taken silently)."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images float [N, 8, 8] (0..16) and labels, as `sklearn.datasets.load_digits` returns them."""
    path = digits_file()
    if path is None:
        from sklearn.datasets import load_digits as sk_digits

        bunch = sk_digits()
        return bunch.images, bunch.target
    rows = np.loadtxt(path, delimiter=",")
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)


def load_digits() -> Dataset:
    """1,797 grey 8x8 digits as uint8 [N, 1, 8, 8] images (0..16 scaled to 0..255), fixed 80/20 split."""
    pixels, target = digits_arrays()
    images = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    labels = target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    train = Split(torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx]))
    test = Split(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx]))
    return image_dataset("digits", train, test, class_names=[str(c) for c in range(10)])
