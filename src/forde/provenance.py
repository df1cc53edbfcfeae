"""Where a result came from: the code that computed it and the exact data it saw.

`results.json` and the W&B run record `run_provenance`: the code version (package version, git commit
and whether the checkout had local changes, each null where unknown), fingerprints of the dataset's
whole training and test splits, and per corrupted set whether it is a file read from
`eval.corrupted_root` or was generated here (with the generator version and seed).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """{"version", "commit", "dirty"} of the running code; never fails (null fields where unknown,
    e.g. an installed copy outside a git checkout, or no git)."""
    try:
        version = metadata.version("forde")
    except metadata.PackageNotFoundError:
        version = None
    if not _in_own_checkout():
        return {"version": version, "commit": None, "dirty": None}
    return {"version": version, "commit": _git("rev-parse", "HEAD"), "dirty": _dirty()}


def _in_own_checkout() -> bool:
    """Whether the package runs from this project's git checkout (src/forde at its top level), not from an
    installed copy that merely sits inside some other repository (a virtual environment in a project)."""
    top = _git("rev-parse", "--show-toplevel")
    return top is not None and (Path(top) / "src" / "forde").resolve() == PACKAGE_DIR


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _dirty() -> bool | None:
    status = _git("status", "--porcelain", "--untracked-files=no", "--", str(PACKAGE_DIR))
    return None if status is None else bool(status)


def test_fingerprint(dataset) -> str:
    """Hash of the whole test split's images and labels: which test images corrupted sets were made from."""
    test = dataset.full.test
    h = hashlib.sha1(test.inputs.contiguous().numpy().tobytes())
    h.update(test.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_provenance(dataset) -> dict:
    """Fingerprints of the whole training split (the PCA cache's key: inputs and normalisation) and test
    split (the corrupted sets' key), and the sizes of the splits a run actually used."""
    from forde.data.pca import fingerprint

    full = dataset.full
    out = {
        "name": full.name,
        "train_fingerprint": fingerprint(full.train.inputs, full.mean, full.std),
        "test_fingerprint": test_fingerprint(dataset),
        "train_size": len(dataset.train),
        "test_size": len(dataset.test),
    }
    if dataset.val is not None:
        out["val_size"] = len(dataset.val)
    return out


def run_provenance(dataset, corrupted_sets) -> dict:
    """What results.json records beside the metrics: code version, dataset fingerprints, and per corrupted
    set its source ("generated" here, with generator version and seed, or "official": a file from elsewhere)."""
    return {
        "code": code_version(),
        "dataset": dataset_provenance(dataset),
        "corrupted_sets": [
            {"corruption": s.corruption, "severity": s.severity, **s.provenance} for s in corrupted_sets
        ],
    }
