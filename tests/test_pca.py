"""PCA: the truth on data of known covariance, the exact uint8 fast path, and the on-disk cache."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from forde.cli import run_pca_command
from forde.config import DataConfig
from forde.data import pca


def _random_covariance(d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigma = Q diag(lam) Q^T with well-separated eigenvalues (so eigenvectors are well determined)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = 2.0 ** -np.arange(d)
    return q @ np.diag(lam) @ q.T, lam, q


def _assert_matches_truth(result: pca.PCA, truth: np.ndarray, k: int, rtol: float) -> None:
    lam, q = np.linalg.eigh(truth)
    lam, q = lam[::-1], q[:, ::-1]
    assert result.eigenvalues.dtype == result.eigenvectors.dtype == torch.float64
    np.testing.assert_allclose(result.eigenvalues.numpy()[:k], lam[:k], rtol=rtol)
    cosines = np.abs(np.sum(result.eigenvectors.numpy()[:, :k] * q[:, :k], axis=0))  # up to sign
    assert cosines.min() > 0.995, cosines


def test_float_features_recover_known_covariance():
    sigma, _, _ = _random_covariance(8, seed=0)
    x = np.random.default_rng(1).multivariate_normal(np.zeros(8), sigma, size=200_000)
    result = pca.compute_pca(torch.from_numpy(x).float(), mean=torch.zeros(8), std=torch.ones(8))
    _assert_matches_truth(result, sigma, k=5, rtol=0.02)


def test_uint8_images_recover_known_covariance():
    """Pixel levels 128 + N(0, Sigma), rounded: covariance Sigma + I/12, then scaled by the normalisation."""
    c, h, w = 3, 2, 2
    d = c * h * w
    sigma, _, _ = _random_covariance(d, seed=2)
    sigma *= 400.0  # a top std of 20 levels: no clipping at 0 or 255
    levels = np.random.default_rng(3).multivariate_normal(np.full(d, 128.0), sigma, size=200_000)
    images = torch.from_numpy(np.clip(np.rint(levels), 0, 255).astype(np.uint8).reshape(-1, c, h, w))
    mean, std = (0.5, 0.4, 0.6), (0.1, 0.2, 0.3)
    scale = np.repeat(np.array(std) * 255.0, h * w)
    truth = (sigma + np.eye(d) / 12.0) / np.outer(scale, scale)
    result = pca.compute_pca(images, mean, std)
    _assert_matches_truth(result, truth, k=4, rtol=0.02)
    assert (result.eigenvalues[:-1] >= result.eigenvalues[1:]).all()


@pytest.mark.parametrize("values", ["uniform", "extremes"])
def test_uint8_fast_path_matches_float64_path(values):
    """Exact up to the final float64 rounding, also for the worst case of 0/255 pixels, over full and partial blocks."""
    gen = torch.Generator().manual_seed(0)
    shape = (2500, 3, 6, 5)
    if values == "uniform":
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    else:
        images = (torch.rand(shape, generator=gen) < 0.5).to(torch.uint8) * 255
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    fast = pca.covariance_uint8(images, std)
    plain = pca.covariance_float64(images, mean, std)
    assert fast.dtype == torch.float64 and fast.shape == (90, 90)
    assert torch.equal(fast, fast.T)
    assert (fast - plain).abs().max() <= 1e-12 * plain.abs().max()
    assert torch.equal(pca.covariance(images, mean, std), fast)


def test_uint8_block_above_exact_bound_is_refused():
    with pytest.raises(ValueError, match="exact only up to 1024"):
        pca.covariance_uint8(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), (0.5,), block=2048)


def test_cache_is_reused_and_keyed_by_data_and_normalisation(tmp_path, monkeypatch):
    images = torch.randint(0, 256, (300, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    calls = []
    real = pca.compute_pca
    monkeypatch.setattr(pca, "compute_pca", lambda *a: calls.append(1) or real(*a))

    first = pca.cached_pca(images, mean, std, tmp_path, "toy")
    second = pca.cached_pca(images.clone(), mean, std, tmp_path, "toy")
    assert len(calls) == 1 and len(list(tmp_path.glob("pca-toy-*.pt"))) == 1
    assert torch.equal(first.eigenvalues, second.eigenvalues) and torch.equal(first.eigenvectors, second.eigenvectors)

    pca.cached_pca(images, mean, (0.2, 0.25, 0.25), tmp_path, "toy")  # other normalisation
    changed = images.clone()
    changed[7, 1, 2, 3] ^= 1
    pca.cached_pca(changed, mean, std, tmp_path, "toy")  # other data, one bit apart
    assert len(calls) == 3 and len(list(tmp_path.glob("pca-toy-*.pt"))) == 3
    assert not list(tmp_path.glob("*.tmp*"))


def test_concurrent_callers_compute_once(tmp_path, monkeypatch):
    """Parallel sweep workers asking for the same PCA: one computes, the others wait and reuse it."""
    images = torch.randint(0, 256, (100, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    calls = []
    real = pca.compute_pca

    def slow(*args):
        calls.append(1)
        time.sleep(0.3)  # long enough for the other threads to arrive while this one computes
        return real(*args)

    monkeypatch.setattr(pca, "compute_pca", slow)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: pca.cached_pca(images, (0.5,), (0.25,), tmp_path, "toy"), range(3)))
    assert len(calls) == 1
    assert all(torch.equal(r.eigenvectors, results[0].eigenvectors) for r in results)


def test_run_pca_command_caches_under_root_and_logs(tmp_path, caplog):
    cfg = DataConfig(name="digits", root=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="forde"):
        result = run_pca_command(cfg)
        run_pca_command(cfg)
    [cached] = (tmp_path / "pca").glob("pca-digits-*.pt")
    assert result.eigenvalues.shape == (64,) and result.eigenvectors.shape == (64, 64)
    assert f"saved {cached}" in caplog.text and f"reusing {cached}" in caplog.text
    assert "top 10 eigenvalues" in caplog.text and f"{result.eigenvalues[0].item():.4g}" in caplog.text
