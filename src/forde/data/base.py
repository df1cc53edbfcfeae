"""What every dataset loader returns: uint8 images (or float features) held in memory, plus their metadata."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from forde.errors import DataError


@dataclass
class Split:
    """One split of a dataset. Images are uint8 [N, C, H, W]; feature/toy data are float32 [N, D]."""

    inputs: torch.Tensor
    labels: torch.Tensor  # int64 [N]

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.inputs.shape[0]} inputs but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.inputs[index], self.labels[index])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean of the [0, 1] images (per-feature for float data)
    std: tuple[float, ...]
    val: Split | None = None
    class_names: tuple[str, ...] = ()
    parent: Dataset | None = None  # the dataset before data.train_subset / data.test_subset

    @property
    def full(self) -> Dataset:
        """The whole training and test splits: what the PCA and the corrupted sets are computed from."""
        return self.parent or self

    @property
    def is_image(self) -> bool:
        return self.train.inputs.dtype == torch.uint8

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.inputs.shape[1:])

    @property
    def eval_split(self) -> Split:
        """Validation when held out, else test: what per-epoch monitoring (and pruning) looks at."""
        return self.val if self.val is not None else self.test


def check_classes(labels: dict[str, Sequence[int] | torch.Tensor], class_names: Sequence[str], where: str) -> None:
    """A classifier needs examples of at least two classes in its training split and in its test split: one line
    otherwise (a one-class set trains to accuracy 1 and NLL 0, which mean nothing)."""
    for split in ("train", "test"):
        present = sorted({int(v) for v in np.asarray(labels[split]).tolist()})
        if len(present) < 2:
            names = ", ".join(class_names[i] if i < len(class_names) else str(i) for i in present)
            raise DataError(
                f"{where}: the {split} split holds examples of {len(present)} class{'es' if len(present) != 1 else ''}"
                f"{f' ({names})' if present else ''}; a classifier needs at least two: add another class's images"
            )


def split_train_val(train: Split, val_fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Hold out a fixed, seed-determined share of the training set."""
    if val_fraction <= 0:
        return train, None
    n = len(train)
    n_val = max(1, int(round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values)


SUBSET_SALT = {"train": 1, "test": 2, "grad": 3}  # independent draws from one seed


def stratified_subset(labels: torch.Tensor, n: int, seed: int, salt: str) -> torch.Tensor:
    """n indices (sorted) drawn at random within each class, the class counts proportional to the labels'.

    Quotas are n * share rounded down, the remainder going to the classes with the largest fractions
    (ties to the smaller class index). The draw depends on the labels, n, the seed and the salt only:
    two sets with the same labels in the same order (a test set and its corrupted copies) get the same
    indices.
    """
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if not 0 < n <= len(y):
        raise ValueError(f"cannot draw {n} of {len(y)} samples")
    classes, counts = np.unique(y, return_counts=True)
    exact = n * counts / len(y)
    quota = np.floor(exact).astype(np.int64)
    remainder = n - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:remainder]] += 1
    rng = np.random.default_rng([seed, SUBSET_SALT[salt]])
    picked = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota)]
    return torch.from_numpy(np.sort(np.concatenate(picked)))


def subset_split(split: Split, n: int | None, seed: int, salt: str) -> Split:
    """The stratified subset of `split`, or `split` itself when n is None or covers it."""
    if n is None or n >= len(split):
        return split
    return split.subset(stratified_subset(split.labels, n, seed, salt))


def with_subsets(ds: Dataset, train: int | None, test: int | None, seed: int) -> Dataset:
    """The dataset with stratified subsets of its training and test splits; `.full` keeps the whole ones."""
    if train is None and test is None:
        return ds
    return replace(
        ds,
        train=subset_split(ds.train, train, seed, "train"),
        test=subset_split(ds.test, test, seed, "test"),
        parent=ds,
    )


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (N-1 denominator) of uint8 [N, C, H, W] images scaled to [0, 1].

    Counted as a 256-bin histogram per channel, chunk by chunk: exact, and no float64 copy of the
    images (which would be ~10 GB for Tiny-ImageNet).
    """
    c = images.shape[1]
    counts = torch.zeros(c, 256, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].transpose(0, 1).reshape(c, -1)
        for k in range(c):
            counts[k] += torch.bincount(block[k], minlength=256)
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum(1).to(torch.float64)
    mean = (counts * levels).sum(1) / n
    var = (counts * (levels - mean[:, None]) ** 2).sum(1) / (n - 1)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def image_dataset(name: str, train: Split, test: Split, class_names, val: Split | None = None) -> Dataset:
    """A uint8 image Dataset normalised with its training images' channel statistics."""
    mean, std = channel_stats(train.inputs)
    return Dataset(
        name, train, test, num_classes=len(class_names), mean=mean, std=std, val=val, class_names=tuple(class_names)
    )
