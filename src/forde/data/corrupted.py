"""Which corrupted test sets a run evaluates on, where they live, building them when missing, and
recording which of them were generated here (`forde-source.json` beside them)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from forde.atomic import write_atomic
from forde.config import ConfigError, DataError, MissingDataError, TrainConfig
from forde.data.base import Dataset, Split, subset_split
from forde.data.corruption_names import CORRUPTIONS, SEVERITIES, select
from forde.errors import one_line
from forde.provenance import code_version, test_fingerprint

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
    """Make sure every requested corruption x severity exists and fits the test set, before any training:
    the sets present are checked (forde.data.corrupted_check), the missing ones generated when allowed."""
    names = select(cfg.eval.corruptions)
    if not names:
        return None
    from forde.data.corrupted_loader import missing_corrupted

    if not dataset.is_image:
        raise ConfigError(
            f"eval.corruptions = {list(cfg.eval.corruptions)} but {dataset.name} is not an image dataset; "
            "set eval.corruptions=[none]"
        )
    root = corrupted_root(cfg, dataset)
    check_source(root, dataset)
    raise_problems(root, dataset, names, cfg.eval.severities)
    missing = missing_corrupted(root, names, cfg.eval.severities)
    if missing and not cfg.eval.generate_corrupted:
        shown = ", ".join(f"{n} s{s}" for n, s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MissingDataError(
            f"{root} lacks {len(missing)} corrupted set(s) ({shown}); point eval.corrupted_root at the "
            "official release, or set eval.generate_corrupted=true to build them locally"
        )
    if missing:
        from forde.data.corrupted_sets import generate_corrupted_set

        log.info("building %d missing corrupted set(s) in %s (seed %d)", len(missing), root, GENERATION_SEED)
        test = dataset.full.test  # the whole test set, whatever data.test_subset: the files are shared by every run
        # every name, not only those with missing sets: blocks left by a stopped run are joined into files too
        generate_corrupted_set(
            test.inputs,
            test.labels,
            root,
            seed=GENERATION_SEED,
            corruptions=names,
            severities=cfg.eval.severities,
            layout=layout_for(dataset),
            class_dirs=dataset.class_names or None,
            progress=cfg.run.progress,
            on_commit=source_recorder(root, dataset, GENERATION_SEED),
        )
    return root


def raise_problems(root: Path, dataset: Dataset, names: Iterable[str], severities: Iterable[int]) -> None:
    """A DataError with one line per problem of the sets present (see forde.data.corrupted_check)."""
    from forde.data.corrupted_check import check_corrupted

    problems = check_corrupted(root, dataset, names, severities)
    if problems:
        raise DataError("\n".join(problems))


def read_source_record(root: Path) -> dict:
    """`forde-source.json` under root ({} when absent), checked: which of the sets there were generated here."""
    path = root / SOURCE_FILE
    if not path.exists():
        return {}
    fix = (
        f"restore it, or delete {root} and generate the sets again (without it, the sets generated there "
        "would be reported as official)"
    )
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is unreadable ({one_line(err)}); {fix}") from None
    generated = record.get("generated", {}) if isinstance(record, dict) else None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("test_fingerprint"), str)
        and isinstance(generated, dict)
        and all(isinstance(v, dict) for v in generated.values())
    ):
        raise DataError(f"{path} is not a record of generated sets (test_fingerprint, generated); {fix}")
    return record


def source_recorder(root: Path, dataset: Dataset, seed: int) -> Callable[[str, int], None]:
    """What the generator calls as it commits each set: adds the set to the root's record (generator version,
    seed, code version) first, so that a stopped generation never leaves a generated set unrecorded."""
    from forde.data.corrupted_sets import GENERATOR_VERSION

    fingerprint = test_fingerprint(dataset)

    def add(name: str, severity: int) -> None:
        record = read_source_record(root)
        generated = record.get("generated", {})
        if record and "generated" not in record:  # an older record, for a folder of generated sets only
            from forde.data.corrupted_loader import missing_corrupted

            absent = set(missing_corrupted(root))
            generated = {
                f"{n}/{k}": {"generator": None, "seed": record.get("seed")}
                for n in CORRUPTIONS
                for k in SEVERITIES
                if (n, k) not in absent
            }
        generated[f"{name}/{severity}"] = {"generator": GENERATOR_VERSION, "seed": seed, "code": code_version()}
        record.update({"test_fingerprint": fingerprint, "seed": seed, "generated": generated})
        write_atomic(root / SOURCE_FILE, json.dumps(record, indent=1))

    return add


def set_provenance(root: Path) -> Callable[[str, int], dict]:
    """(corruption, severity) -> {"source": "generated", "generator", "seed", "code"} for a set generated
    under `root`, {"source": "official"} for any other set there (a file put there from elsewhere,
    presumably the released set). A record written before per-set entries existed (no "generated" key)
    was written for a folder of generated sets only: every set under it counts as generated, generator
    version unknown."""
    record = read_source_record(root)
    if record and "generated" not in record:
        return lambda name, severity: {"source": "generated", "generator": None, "seed": record.get("seed")}
    generated = record.get("generated", {})

    def lookup(name: str, severity: int) -> dict:
        entry = generated.get(f"{name}/{severity}")
        return {"source": "generated", **entry} if entry is not None else {"source": "official"}

    return lookup


def check_source(root: Path, dataset: Dataset) -> None:
    """Sets generated here from other test images (an older import, another split) must not be reused."""
    record = read_source_record(root)
    if record and record["test_fingerprint"] != test_fingerprint(dataset):
        raise ConfigError(
            f"the corrupted sets in {root} were generated from other {dataset.name} test images; "
            f"remove {root} to rebuild them, or set eval.corrupted_root elsewhere"
        )


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

            def load(n: str = name, k: int = severity) -> Split:
                return subset(load_corrupted(root, n, k))

            yield CorruptedSet(name, severity, load, provenance(name, severity))
