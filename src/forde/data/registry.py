"""One entry point from a DataConfig to a Dataset, whatever the source.

A folder imported under <data.root>/<name>/ (`forde data import-folder SRC NAME`) wins over the
built-in source of the same name, so an imported CIFAR-10 needs no python batches.
"""

from __future__ import annotations

from typing import Callable

from forde.config import ConfigError, DataConfig
from forde.data.base import Dataset, split_train_val, with_subsets
from forde.data.cifar import load_cifar
from forde.data.imagefolder import LAYOUT, imported_names, is_imported, load_imported
from forde.data.tinyimagenet import load_tinyimagenet
from forde.data.toy import load_digits

LOADERS: dict[str, Callable[[DataConfig], Dataset]] = {
    "digits": lambda cfg: load_digits(),
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "tinyimagenet": load_tinyimagenet,
}


def _read(cfg: DataConfig) -> Dataset:
    if is_imported(cfg.root, cfg.name):
        return load_imported(cfg.root, cfg.name)
    if cfg.name in LOADERS:
        return LOADERS[cfg.name](cfg)
    imported = imported_names(cfg.root)
    raise ConfigError(
        f"data.name = {cfg.name!r}: unknown dataset; built in: {', '.join(sorted(LOADERS))}; imported under "
        f"data.root = {cfg.root}: {', '.join(imported) or 'none'}. Import an ImageFolder tree ({LAYOUT}) with "
        f"`forde data import-folder SRC {cfg.name}`.")


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read the dataset, hold out the validation split (a dataset's own val split, else data.val_fraction),
    then draw the data.train_subset / data.test_subset subsets (the whole splits stay in `.full`)."""
    ds = _read(cfg)
    if ds.val is not None:
        if cfg.val_fraction > 0:
            raise ConfigError(f"data.val_fraction = {cfg.val_fraction}: dataset {cfg.name!r} has its own validation "
                              "split; set data.val_fraction=0 to use it")
    else:
        ds.train, ds.val = split_train_val(ds.train, cfg.val_fraction, cfg.split_seed)
    for key, n, split in (("data.train_subset", cfg.train_subset, ds.train), ("data.test_subset", cfg.test_subset, ds.test)):
        if n is not None and n > len(split):
            raise ConfigError(f"{key} = {n} exceeds the {len(split)} samples of {cfg.name}'s "
                              f"{key.split('.')[1].split('_')[0]} split; lower it, or set {key}=null for all of them")
    return with_subsets(ds, cfg.train_subset, cfg.test_subset, cfg.split_seed)
