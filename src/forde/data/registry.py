"""One entry point from a DataConfig to a Dataset, whatever the source."""

from __future__ import annotations

from typing import Callable

from forde.config import ConfigError, DataConfig
from forde.data.base import Dataset, split_train_val
from forde.data.toy import load_digits

LOADERS: dict[str, Callable[[DataConfig], Dataset]] = {
    "digits": lambda cfg: load_digits(),
}


def load_dataset(cfg: DataConfig) -> Dataset:
    if cfg.name not in LOADERS:
        raise ConfigError(f"data.name = {cfg.name!r}: unknown dataset; known: {', '.join(sorted(LOADERS))}")
    ds = LOADERS[cfg.name](cfg)
    ds.train, ds.val = split_train_val(ds.train, cfg.val_fraction, cfg.split_seed)
    return ds
