"""Datasets that need no download: scikit-learn's bundled 8x8 digits (the quickstart)."""

from __future__ import annotations

import numpy as np
import torch

from forde.data.base import Dataset, Split, image_dataset

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 1234  # fixed so every run sees the same test set


def load_digits() -> Dataset:
    """1,797 grey 8x8 digits as uint8 [N, 1, 8, 8] images (0..16 scaled to 0..255), fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    train = Split(torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx]))
    test = Split(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx]))
    return image_dataset("digits", train, test, class_names=[str(c) for c in range(10)])
