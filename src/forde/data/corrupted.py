"""Which corrupted test sets a run evaluates on, where they live, and building them when missing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from forde.config import ConfigError, TrainConfig
from forde.data.base import Dataset, Split
from forde.data.corruption_names import select

log = logging.getLogger(__name__)

GENERATION_SEED = 0  # one fixed draw: every run of a dataset is scored on the same corrupted pixels


def corrupted_root(cfg: TrainConfig, dataset: Dataset) -> Path:
    """`eval.corrupted_root`, else `<data.root>/<dataset>-C` (where locally generated sets go)."""
    return Path(cfg.eval.corrupted_root) if cfg.eval.corrupted_root else Path(cfg.data.root) / f"{dataset.name}-C"


def layout_for(dataset: Dataset) -> str:
    """The official layouts: CIFAR-10/100-C are .npy arrays, Tiny-ImageNet-C is JPEG folders."""
    return "folder" if dataset.input_shape[-1] == 64 else "npy"


def prepare_corrupted(cfg: TrainConfig, dataset: Dataset) -> Path | None:
    """Make sure every requested corruption x severity exists, generating what is missing when allowed."""
    names = select(cfg.eval.corruptions)
    if not names:
        return None
    from forde.data.corruptions import generate_corrupted_set, missing_corrupted

    if not dataset.is_image:
        raise ConfigError(f"eval.corruptions = {list(cfg.eval.corruptions)} but {dataset.name} is not an image dataset; "
                          "set eval.corruptions=[none]")
    root = corrupted_root(cfg, dataset)
    missing = missing_corrupted(root, names, cfg.eval.severities)
    if missing and not cfg.eval.generate_corrupted:
        raise ConfigError(f"{root} lacks corrupted sets {sorted(missing)}; point eval.corrupted_root at the official "
                          "release, or set eval.generate_corrupted=true to build them locally")
    if missing:
        log.info("building %d missing corrupted set(s) in %s (seed %d)", len(missing), root, GENERATION_SEED)
        generate_corrupted_set(dataset.test.inputs, dataset.test.labels, root, seed=GENERATION_SEED,
                               corruptions=tuple(sorted(missing, key=names.index)), layout=layout_for(dataset),
                               class_names=dataset.class_names or None)
    return root


def corrupted_sets(cfg: TrainConfig, dataset: Dataset) -> Iterator[tuple[str, int, Split]]:
    names = select(cfg.eval.corruptions)
    if not names:
        return
    from forde.data.corruptions import load_corrupted

    root = corrupted_root(cfg, dataset)
    for name in names:
        for severity in cfg.eval.severities:
            yield name, severity, load_corrupted(root, name, severity)
