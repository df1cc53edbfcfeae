"""Provenance: results.json and the W&B run say which code ran, on which data, and which corrupted sets
were generated here rather than read from files put in place (the official release)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forde import provenance
from forde.config import load_config
from forde.data.corrupted import SOURCE_FILE, corrupted_root, corrupted_sets, prepare_corrupted
from forde.data.corrupted_sets import GENERATOR_VERSION
from forde.data.pca import fingerprint
from forde.data.registry import load_dataset
from forde.run_dir import run_dir_of
from forde.tracking import WandbRun
from forde.train import train

WANDB = [sys.executable, "-m", "wandb"]


def place_official_set(root: Path, dataset, name: str) -> None:
    """A set in the official npy layout that this project did not generate (here: the clean images)."""
    root.mkdir(parents=True, exist_ok=True)
    images = dataset.full.test.inputs.permute(0, 2, 3, 1).numpy()
    np.save(root / f"{name}.npy", np.concatenate([images] * 5))
    np.save(root / "labels.npy", np.tile(dataset.full.test.labels.numpy(), 5).astype(np.uint8))


def config(tmp_path, *extra):
    return load_config(
        "quickstart",
        [
            f"data.root={tmp_path / 'data'}",
            f"run.out_dir={tmp_path / 'runs'}",
            "eval.corruptions=[gaussian_noise,fog]",
            "eval.severities=[1,2]",
            "optim.epochs=1",
            "model.hidden=[16]",
            "ensemble_size=2",
            "eval.grad_samples=50",
            "run.progress=false",
            "run.wandb.mode=offline",
            *extra,
        ],
    )


def test_results_and_wandb_record_code_data_and_each_sets_source(tmp_path):
    cfg = config(tmp_path)
    ds = load_dataset(cfg.data)
    place_official_set(corrupted_root(cfg, ds), ds, "fog")
    tracker = WandbRun(cfg, run_dir_of(cfg), run_id="provenance-test", name="provenance-test")
    try:
        results = train(cfg, callbacks=[tracker])
    finally:
        tracker.finish()
    prov = json.loads((run_dir_of(cfg) / "results.json").read_text())["provenance"]
    assert prov["code"] == provenance.code_version() and set(prov["code"]) == {"version", "commit", "dirty"}
    assert prov["dataset"]["train_fingerprint"] == fingerprint(ds.train.inputs, ds.mean, ds.std)
    assert prov["dataset"]["test_size"] == len(ds.test)
    sources = {(s["corruption"], s["severity"]): s for s in prov["corrupted_sets"]}
    assert sources[("fog", 1)] == {"corruption": "fog", "severity": 1, "source": "official"}
    made = sources[("gaussian_noise", 2)]
    assert (made["source"], made["generator"], made["seed"], made["code"]) == (
        "generated",
        GENERATOR_VERSION,
        0,
        provenance.code_version(),
    )
    assert [r["source"] for r in results["corrupted"]["per_set"]] == ["generated"] * 2 + ["official"] * 2
    assert results["summary"]["corrupted/regenerated_sets"] == 2
    [wandb_dir] = run_dir_of(cfg).glob("wandb/offline-run-*")
    record = json.loads(
        subprocess.run(
            [*WANDB, "leet", "inspect", "--summary", "--json", str(wandb_dir)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert record["config"]["provenance"]["corrupted_sets"] == prov["corrupted_sets"]
    assert record["config"]["code"]["commit"] == prov["code"]["commit"]
    assert record["summary"]["corrupted/regenerated_sets"] == 2
    assert record["summary"]["corrupted/ece"] == pytest.approx(results["summary"]["corrupted/ece"])


def test_a_record_from_before_per_set_entries_counts_every_set_as_generated(tmp_path):
    cfg = config(tmp_path, "eval.corruptions=[gaussian_noise]", "eval.severities=[1]")
    ds = load_dataset(cfg.data)
    root = prepare_corrupted(cfg, ds)
    record = json.loads((root / SOURCE_FILE).read_text())
    (root / SOURCE_FILE).write_text(json.dumps({"test_fingerprint": record["test_fingerprint"], "seed": 0}))
    [old] = corrupted_sets(cfg, ds)
    assert old.provenance == {"source": "generated", "generator": None, "seed": 0}
    cfg.eval.severities = [1, 2]  # generating more upgrades the record and keeps the older set as generated
    prepare_corrupted(cfg, ds)
    first, second = corrupted_sets(cfg, ds)
    assert first.provenance["generator"] is None and second.provenance["generator"] == GENERATOR_VERSION


def test_code_version_outside_its_own_checkout_is_null_not_an_error(tmp_path, monkeypatch):
    """Not in git at all, or an installed copy inside another repository: no commit (rather than a wrong one)."""
    other_repo = tmp_path / "project"
    (other_repo / ".venv" / "forde").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(other_repo)], check=True)
    try:
        for package_dir in (tmp_path, other_repo / ".venv" / "forde"):
            monkeypatch.setattr(provenance, "PACKAGE_DIR", package_dir)
            provenance.code_version.cache_clear()
            version = provenance.code_version()
            assert version["commit"] is None and version["dirty"] is None
    finally:
        provenance.code_version.cache_clear()
