"""data.train_subset / data.test_subset: seeded, class-stratified, the same draw for the clean test set and
every corrupted set, while the PCA and the corrupted files come from the whole splits."""

import numpy as np
import pytest
import torch

from forde.config import ConfigError, DataConfig, load_config
from forde.data.base import stratified_subset
from forde.data.corrupted import corrupted_sets, prepare_corrupted
from forde.data.corrupted_loader import load_corrupted
from forde.data.pca import dataset_pca, fingerprint
from forde.data.registry import load_dataset


def test_subsets_are_stratified_seeded_and_keep_the_whole_splits(tmp_path):
    whole = load_dataset(DataConfig(name="digits", root=str(tmp_path)))
    cfg = DataConfig(name="digits", root=str(tmp_path), train_subset=200, test_subset=50, split_seed=4)
    ds = load_dataset(cfg)
    assert (len(ds.train), len(ds.test)) == (200, 50)
    assert ds.full.train is not ds.train and torch.equal(ds.full.test.labels, whole.test.labels)
    assert ds.mean == whole.mean and ds.std == whole.std  # normalisation of the whole training set
    for part, full, n in ((ds.train, whole.train, 200), (ds.test, whole.test, 50)):
        share = torch.bincount(part.labels, minlength=10).double() / n
        assert (share - torch.bincount(full.labels, minlength=10).double() / len(full)).abs().max() <= 1 / n
    again = load_dataset(cfg)
    assert torch.equal(again.train.inputs, ds.train.inputs) and torch.equal(again.test.labels, ds.test.labels)
    cfg.split_seed = 5
    assert not torch.equal(load_dataset(cfg).train.labels, ds.train.labels)
    # the PCA is the whole training split's (its cache key is the fingerprint of the inputs it was computed on)
    dataset_pca(ds, tmp_path)
    key = fingerprint(whole.train.inputs, whole.mean, whole.std)
    assert [p.name for p in (tmp_path / "pca").glob("*.pt")] == [f"pca-digits-{key}.pt"]


def test_subset_larger_than_the_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.test_subset = 5000 exceeds the 359 samples"):
        load_dataset(DataConfig(name="digits", root=str(tmp_path), test_subset=5000))
    with pytest.raises(ConfigError, match=r"data.train_subset = 0: must be a positive sample count"):
        load_config("quickstart", ["data.train_subset=0"])


def test_corrupted_sets_are_generated_from_the_whole_test_set_and_subset_like_it(tmp_path):
    cfg = load_config(
        "quickstart",
        [
            f"data.root={tmp_path}",
            "data.test_subset=60",
            "data.split_seed=2",
            "eval.corruptions=[gaussian_noise,contrast]",
            "eval.severities=[1,3]",
            "run.progress=false",
        ],
    )
    ds = load_dataset(cfg.data)
    root = prepare_corrupted(cfg, ds)
    idx = stratified_subset(ds.full.test.labels, 60, 2, "test")
    assert torch.equal(ds.test.inputs, ds.full.test.inputs[idx])
    sets = list(corrupted_sets(cfg, ds))
    assert [(s.corruption, s.severity) for s in sets] == [
        ("gaussian_noise", 1),
        ("gaussian_noise", 3),
        ("contrast", 1),
        ("contrast", 3),
    ]
    for s in sets:
        whole = load_corrupted(root, s.corruption, s.severity)
        assert len(whole) == len(ds.full.test)  # the files hold every test image
        split = s.load()
        assert torch.equal(split.labels, ds.test.labels)
        assert torch.equal(split.inputs, whole.inputs[idx])  # the clean subset's images, corrupted
    # contrast keeps the image's structure: a corrupted image correlates with its own clean image
    clean = ds.test.inputs.double().flatten(1)
    faded = sets[2].load().inputs.double().flatten(1)
    corr = np.corrcoef(torch.cat([clean, faded]).numpy())[:60, 60:]
    assert (corr.argmax(1) == np.arange(60)).all()
