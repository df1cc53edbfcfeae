"""What every dataset loader returns: uint8 images (or float features) held in memory, plus their metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def subset(self, index: torch.Tensor) -> "Split":
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


def split_train_val(train: Split, val_fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Hold out a fixed, seed-determined share of the training set."""
    if val_fraction <= 0:
        return train, None
    n = len(train)
    n_val = max(1, int(round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (N-1 denominator) of uint8 [N, C, H, W] images scaled to [0, 1].

    Counted as a 256-bin histogram per channel, chunk by chunk: exact, and no float64 copy of the
    images (which would be ~10 GB for Tiny-ImageNet).
    """
    c = images.shape[1]
    counts = torch.zeros(c, 256, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        block = images[start:start + chunk].transpose(0, 1).reshape(c, -1)
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
    return Dataset(name, train, test, num_classes=len(class_names), mean=mean, std=std, val=val,
                   class_names=tuple(class_names))
