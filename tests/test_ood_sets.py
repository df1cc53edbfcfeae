"""OOD test sets (forde.data.ood_sets) and what a run reports of them: the noise sets that need no download, SVHN in
torchvision's file, another dataset's test split fitted to the in-distribution shape, missing files as one line
before training, and a run's OOD and temperature-scaled metrics end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from forde.cli import main
from forde.config import DataConfig, MissingDataError, load_config
from forde.data.ood_sets import MAX_NOISE_IMAGES, fit_to, noise_images, ood_sets, read_svhn
from forde.data.registry import load_dataset
from forde.metrics import PooledMetrics, ensemble_metrics
from test_datasets import write_cifar10, write_cifar100

SMALL = [
    "run.progress=false",
    "run.wandb.mode=disabled",
    "ensemble_size=2",
    "model.hidden=[16]",
    "optim.batch_size=32",
    "optim.epochs=1",
    "eval.corruptions=[none]",
    "eval.grad_samples=0",
]


def test_noise_sets_have_the_test_shape_and_the_same_pixels_every_time():
    digits = load_dataset(DataConfig(name="digits"))
    for name in ("gaussian_noise", "uniform_noise"):
        a, b = noise_images(name, digits), noise_images(name, digits)
        assert a.dtype == torch.uint8 and a.shape == (min(len(digits.test), MAX_NOISE_IMAGES), 1, 8, 8)
        assert torch.equal(a, b)
    gauss = noise_images("gaussian_noise", digits).double().flatten()
    # the training images' mean and std (clipping at 0 and 255 leaves the median and the quartiles inside alone)
    median, q1, q3 = (gauss.quantile(q).item() for q in (0.5, 0.25, 0.75))
    assert abs(median - 255 * digits.mean[0]) < 3
    assert abs((q3 - q1) / 1.349 - 255 * digits.std[0]) < 5  # a normal's interquartile range is 1.349 sigma


def test_images_are_fitted_to_the_in_distribution_shape_as_pillow_would():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    got = fit_to(torch.from_numpy(rgb).permute(0, 3, 1, 2), (3, 32, 32))
    want = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in rgb])
    assert np.abs(got.permute(0, 2, 3, 1).numpy().astype(int) - want).max() <= 1
    grey = fit_to(torch.from_numpy(rgb).permute(0, 3, 1, 2), (1, 64, 64))
    want_grey = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
    assert np.abs(grey[:, 0].numpy().astype(int) - want_grey).max() <= 1
    assert torch.equal(fit_to(grey, (3, 64, 64)), grey.expand(-1, 3, -1, -1))


def test_svhn_is_read_from_torchvision_s_file(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": images, "y": np.arange(5)[:, None]})
    assert torch.equal(read_svhn(tmp_path), torch.from_numpy(images.transpose(3, 2, 0, 1)))


def test_a_missing_ood_set_is_one_line_before_training(tmp_path, capsys):
    args = ["train", "quickstart", f"run.out_dir={tmp_path / 'runs'}", f"data.root={tmp_path}", *SMALL]
    assert main([*args, "eval.ood=[svhn]"]) == 2
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("forde:")]
    assert f"the SVHN test split is not at {tmp_path / 'svhn' / 'test_32x32.mat'}; download http" in line
    assert not list(tmp_path.rglob("metrics.jsonl"))
    assert main([*args, "eval.ood=[cifar100, svhn]"]) == 2  # every missing set named in the one line
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("forde:")]
    assert "2 set(s) missing" in line and "cifar-100-python" in line and "svhn" in line
    assert "forde data import-folder SRC cifar100" in line and "data.name" not in line


def test_an_unreadable_ood_set_is_one_line_before_training(tmp_path, capsys):
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"not a MATLAB file" * 10)
    args = ["train", "quickstart", f"run.out_dir={tmp_path / 'runs'}", f"data.root={tmp_path}", *SMALL]
    assert main([*args, "eval.ood=[svhn]"]) == 2
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("forde:")]
    assert "test_32x32.mat is unreadable" in line
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_a_download_that_fails_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets, "SVHN", offline)
    args = ["train", "quickstart", f"run.out_dir={tmp_path / 'runs'}", f"data.root={tmp_path}", *SMALL]
    assert main([*args, "eval.ood=[svhn]", "data.download=true"]) == 2
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("forde:")]
    assert "downloading svhn" in line and "Name or service not known" in line
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_another_dataset_s_test_split_is_an_ood_set(tmp_path):
    write_cifar100(tmp_path, n=40)
    write_cifar10(tmp_path)
    cfg = load_config("quickstart", [f"data.root={tmp_path}", "data.name=cifar100", "eval.ood=[cifar10, cifar100]"])
    [cifar10] = ood_sets(cfg, load_dataset(cfg.data))  # the in-distribution set itself is left out
    images = cifar10.load()
    assert cifar10.name == "cifar10" and images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
    with pytest.raises(MissingDataError, match="cifar-10-batches-py"):
        ood_sets(
            load_config("quickstart", [f"data.root={tmp_path / 'none'}", "eval.ood=[cifar10]"]), load_dataset(cfg.data)
        )


def test_pooled_sets_give_the_metrics_of_their_union_before_and_after_scaling():
    g = torch.Generator().manual_seed(0)
    sets = [
        (torch.randn(3, n, 5, generator=g).log_softmax(-1), torch.randint(0, 5, (n,), generator=g)) for n in (40, 61)
    ]
    pool = PooledMetrics(temperature=1.7)
    for lp, y in sets:
        pool.add(lp, y)
    union = ensemble_metrics(torch.cat([lp for lp, _ in sets], 1), torch.cat([y for _, y in sets]), temperature=1.7)
    got = pool.result()
    for key, value in union.items():
        if key != "member_accuracy":
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_a_run_reports_ood_calibration_and_abstention_before_and_after_temperature_scaling(tmp_path, capsys):
    args = ["train", "quickstart", f"run.out_dir={tmp_path}", "run.name=run", f"data.root={tmp_path / 'data'}", *SMALL]
    assert main([*args, "data.val_fraction=0.2"]) == 0
    out = capsys.readouterr().out
    assert "test, T = " in out and "OOD gaussian_noise (msp)" in out and "AUROC" in out and "AUGRC" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    summary = results["summary"]
    assert 0.05 < summary["temperature"] == results["temperature"] < 20
    for key in ("brier", "adaptive_ece", "mce", "entropy", "aurc", "augrc", "ts/nll", "ts/ece", "ts/brier"):
        assert 0 <= summary[f"test/{key}"] < 10, key
    for name in ("gaussian_noise", "uniform_noise"):
        for key in ("auroc_msp", "aupr_in_mi", "aupr_out_energy", "fpr95_max_logit", "auroc_entropy", "ts/auroc_msp"):
            assert 0 <= summary[f"ood/{name}/{key}"] <= 1, (name, key)
    assert set(results["curves"]["test"]) == {"reliability", "risk_coverage", "ts/reliability", "ts/risk_coverage"}
    # one temperature per member: each member calibrated, then averaged
    assert main([*args, "data.val_fraction=0.2", "run.name=members", "eval.calibrate_members=true"]) == 0
    per_member = json.loads((tmp_path / "members" / "results.json").read_text())
    assert len(per_member["member_temperatures"]) == 2 and "temperature" not in per_member
    assert per_member["summary"]["test/accuracy"] == summary["test/accuracy"]
    assert per_member["summary"]["test/ts/nll"] != summary["test/ts/nll"]
    # without a validation split: no temperature, one line saying how to get one; asked for, refused before training
    assert main([*args, "run.name=plain"]) == 0
    assert "temperature" not in json.loads((tmp_path / "plain" / "results.json").read_text())
    assert main([*args, "run.name=asked", "eval.calibrate=true"]) == 2
    assert (
        "set data.val_fraction=0.1" in capsys.readouterr().err and not (tmp_path / "asked" / "metrics.jsonl").exists()
    )
