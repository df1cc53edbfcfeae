"""One entry point from a DataConfig to a Dataset, whatever the source.

A folder imported under <data.root>/<name>/ (`forde data import-folder SRC NAME`) wins over the
built-in source of the same name, so an imported CIFAR-10 needs no python batches.
"""

from __future__ import annotations

from collections.abc import Callable

from forde.config import ConfigError, DataConfig
from forde.data.base import Dataset, check_classes, split_train_val, with_subsets
from forde.data.cifar import load_cifar
from forde.data.imagefolder import LAYOUT, imported_dir, imported_names, is_imported, load_imported
from forde.data.store import store_spec
from forde.data.tinyimagenet import load_tinyimagenet
from forde.data.toy import load_digits

LOADERS: dict[str, Callable[[DataConfig], Dataset]] = {
    "digits": lambda cfg: load_digits(),
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "tinyimagenet": load_tinyimagenet,
}

# (input shape, classes) of each built-in dataset: the model is checked against them before the data is read
INPUT_SPECS: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "tinyimagenet": ((3, 64, 64), 200),
}


def _read(cfg: DataConfig) -> Dataset:
    if is_imported(cfg.root, cfg.name):
        return load_imported(cfg.root, cfg.name)
    if cfg.name in LOADERS:
        return LOADERS[cfg.name](cfg)
    raise _unknown(cfg)


def input_spec(cfg: DataConfig) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) of the dataset `load_dataset(cfg)` reads, without reading it."""
    if is_imported(cfg.root, cfg.name):
        return store_spec(imported_dir(cfg.root, cfg.name))
    if cfg.name in INPUT_SPECS:
        return INPUT_SPECS[cfg.name]
    raise _unknown(cfg)


def _unknown(cfg: DataConfig) -> ConfigError:
    imported = imported_names(cfg.root)
    return ConfigError(
        f"data.name = {cfg.name!r}: unknown dataset; built in: {', '.join(sorted(LOADERS))}; imported under "
        f"data.root = {cfg.root}: {', '.join(imported) or 'none'}. Import an ImageFolder tree ({LAYOUT}) with "
        f"`forde data import-folder SRC {cfg.name}`."
    )


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read the dataset, hold out the validation split (a dataset's own val split, else data.val_fraction),
    then draw the data.train_subset / data.test_subset subsets (the whole splits stay in `.full`)."""
    ds = _read(cfg)
    check_classes({"train": ds.train.labels, "test": ds.test.labels}, ds.class_names, f"dataset {cfg.name!r}")
    if ds.val is not None:
        if cfg.val_fraction > 0:
            raise ConfigError(
                f"data.val_fraction = {cfg.val_fraction}: dataset {cfg.name!r} has its own validation "
                "split; set data.val_fraction=0 to use it"
            )
    else:
        ds.train, ds.val = split_train_val(ds.train, cfg.val_fraction, cfg.split_seed)
    for key, n, split in (
        ("data.train_subset", cfg.train_subset, ds.train),
        ("data.test_subset", cfg.test_subset, ds.test),
    ):
        if n is not None and n > len(split):
            raise ConfigError(
                f"{key} = {n} exceeds the {len(split)} samples of {cfg.name}'s "
                f"{key.split('.')[1].split('_')[0]} split; lower it, or set {key}=null for all of them"
            )
    return with_subsets(ds, cfg.train_subset, cfg.test_subset, cfg.split_seed)
