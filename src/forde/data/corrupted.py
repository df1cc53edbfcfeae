"""Which corrupted test sets a run evaluates on, where they live, and building them when missing."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

from forde.config import ConfigError, MissingDataError, TrainConfig
from forde.data.base import Dataset, Split
from forde.data.corruption_names import select

log = logging.getLogger(__name__)

GENERATION_SEED = 0  # one fixed draw: every run of a dataset is scored on the same corrupted pixels
SOURCE_FILE = "forde-source.json"  # written beside generated sets: which test images they were made from


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
    from forde.data.corrupted_loader import missing_corrupted
    from forde.data.corrupted_sets import generate_corrupted_set

    if not dataset.is_image:
        raise ConfigError(f"eval.corruptions = {list(cfg.eval.corruptions)} but {dataset.name} is not an image dataset; "
                          "set eval.corruptions=[none]")
    root = corrupted_root(cfg, dataset)
    check_source(root, dataset)
    missing = missing_corrupted(root, names, cfg.eval.severities)
    if missing and not cfg.eval.generate_corrupted:
        shown = ", ".join(f"{n} s{s}" for n, s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MissingDataError(f"{root} lacks {len(missing)} corrupted set(s) ({shown}); point eval.corrupted_root at the "
                          "official release, or set eval.generate_corrupted=true to build them locally")
    if missing:
        todo = tuple(n for n in names if any(m == n for m, _ in missing))
        log.info("building %d missing corrupted set(s) in %s (seed %d)", len(missing), root, GENERATION_SEED)
        generate_corrupted_set(dataset.test.inputs, dataset.test.labels, root, seed=GENERATION_SEED,
                               corruptions=todo, severities=cfg.eval.severities, layout=layout_for(dataset),
                               class_dirs=dataset.class_names or None, progress=cfg.run.progress)
        record_source(root, dataset)
    return root


def record_source(root: Path, dataset: Dataset) -> None:
    (root / SOURCE_FILE).write_text(json.dumps({"test_fingerprint": _fingerprint(dataset), "seed": GENERATION_SEED}))


def _fingerprint(dataset: Dataset) -> str:
    h = hashlib.sha1(dataset.test.inputs.contiguous().numpy().tobytes())
    h.update(dataset.test.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def check_source(root: Path, dataset: Dataset) -> None:
    """Sets generated here from other test images (an older import, another split) must not be reused."""
    source = root / SOURCE_FILE
    if source.exists() and json.loads(source.read_text())["test_fingerprint"] != _fingerprint(dataset):
        raise ConfigError(f"the corrupted sets in {root} were generated from other {dataset.name} test images; "
                          f"remove {root} to rebuild them, or set eval.corrupted_root elsewhere")


def corrupted_sets(cfg: TrainConfig, dataset: Dataset) -> Iterator[tuple[str, int, Split]]:
    names = select(cfg.eval.corruptions)
    if not names:
        return
    from forde.data.corrupted_loader import load_corrupted

    root = corrupted_root(cfg, dataset)
    for name in names:
        for severity in cfg.eval.severities:
            yield name, severity, load_corrupted(root, name, severity)
