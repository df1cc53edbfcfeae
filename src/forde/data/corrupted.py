"""Which corrupted test sets a run evaluates on, where they live, building them when missing, and
recording which of them were generated here (`forde-source.json` beside them)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from forde.config import ConfigError, MissingDataError, TrainConfig
from forde.data.base import Dataset, Split, subset_split
from forde.data.corruption_names import CORRUPTIONS, SEVERITIES, select

log = logging.getLogger(__name__)

GENERATION_SEED = 0  # one fixed draw: every run of a dataset is scored on the same corrupted pixels
SOURCE_FILE = "forde-source.json"  # written beside generated sets: which test images, which sets, which generator


@dataclass
class CorruptedSet:
    """One corruption x severity to evaluate on, and where it came from (see `set_provenance`)."""

    corruption: str
    severity: int
    load: Callable[[], Split]  # read when evaluated, so that one set at a time is in memory
    provenance: dict = field(default_factory=lambda: {"source": "unknown"})


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
        from forde.data.corrupted_sets import generate_corrupted_set

        todo = tuple(n for n in names if any(m == n for m, _ in missing))
        log.info("building %d missing corrupted set(s) in %s (seed %d)", len(missing), root, GENERATION_SEED)
        test = dataset.full.test  # the whole test set, whatever data.test_subset: the files are shared by every run
        report = generate_corrupted_set(test.inputs, test.labels, root, seed=GENERATION_SEED, corruptions=todo,
                                        severities=cfg.eval.severities, layout=layout_for(dataset),
                                        class_dirs=dataset.class_names or None, progress=cfg.run.progress)
        record_source(root, dataset, report.written, GENERATION_SEED)
    return root


def record_source(root: Path, dataset: Dataset, written: Iterable[tuple[str, int]], seed: int) -> None:
    """Add the sets just generated to the root's record (with the generator version, seed and code version)."""
    from forde.data.corrupted_sets import GENERATOR_VERSION
    from forde.provenance import code_version

    path = root / SOURCE_FILE
    record = json.loads(path.read_text()) if path.exists() else {}
    generated = record.get("generated", {})
    if record and "generated" not in record:  # an older record, for a folder of generated sets only
        from forde.data.corrupted_loader import missing_corrupted

        absent = set(missing_corrupted(root))
        generated = {f"{n}/{k}": {"generator": None, "seed": record.get("seed")}
                     for n in CORRUPTIONS for k in SEVERITIES if (n, k) not in absent}
    for name, severity in written:
        generated[f"{name}/{severity}"] = {"generator": GENERATOR_VERSION, "seed": seed, "code": code_version()}
    record.update({"test_fingerprint": test_fingerprint(dataset), "seed": seed, "generated": generated})
    path.write_text(json.dumps(record, indent=1))


def set_provenance(root: Path) -> Callable[[str, int], dict]:
    """(corruption, severity) -> {"source": "generated", "generator", "seed", "code"} for a set generated
    under `root`, {"source": "official"} for any other set there (a file put there from elsewhere,
    presumably the released set). A record written before per-set entries existed (no "generated" key)
    was written for a folder of generated sets only: every set under it counts as generated, generator
    version unknown."""
    path = root / SOURCE_FILE
    record = json.loads(path.read_text()) if path.exists() else {}
    if record and "generated" not in record:
        return lambda name, severity: {"source": "generated", "generator": None, "seed": record.get("seed")}
    generated = record.get("generated", {})

    def lookup(name: str, severity: int) -> dict:
        entry = generated.get(f"{name}/{severity}")
        return {"source": "generated", **entry} if entry is not None else {"source": "official"}
    return lookup


def test_fingerprint(dataset: Dataset) -> str:
    """Hash of the whole test split's images and labels: which test images corrupted sets were made from."""
    test = dataset.full.test
    h = hashlib.sha1(test.inputs.contiguous().numpy().tobytes())
    h.update(test.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def check_source(root: Path, dataset: Dataset) -> None:
    """Sets generated here from other test images (an older import, another split) must not be reused."""
    source = root / SOURCE_FILE
    if source.exists() and json.loads(source.read_text())["test_fingerprint"] != test_fingerprint(dataset):
        raise ConfigError(f"the corrupted sets in {root} were generated from other {dataset.name} test images; "
                          f"remove {root} to rebuild them, or set eval.corrupted_root elsewhere")


def corrupted_sets(cfg: TrainConfig, dataset: Dataset) -> Iterator[CorruptedSet]:
    """Every configured corruption x severity (each read when its `load` is called), with its provenance.

    With data.test_subset, each set gets the stratified subset drawn from its own labels with the clean
    test subset's seed: sets in the test set's order (all generated ones) get the very same images."""
    names = select(cfg.eval.corruptions)
    if not names:
        return
    from forde.data.corrupted_loader import load_corrupted

    root = corrupted_root(cfg, dataset)
    provenance = set_provenance(root)
    subset = lambda split: subset_split(split, cfg.data.test_subset, cfg.data.split_seed, "test")  # noqa: E731
    for name in names:
        for severity in cfg.eval.severities:
            yield CorruptedSet(name, severity, lambda n=name, k=severity: subset(load_corrupted(root, n, k)),
                               provenance(name, severity))
