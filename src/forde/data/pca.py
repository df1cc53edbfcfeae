"""PCA of the normalised, flattened training inputs: the basis and eigenvalues behind FoRDE's lengthscales.

Computed once in float64 and cached on disk, keyed by a fingerprint of the exact training inputs and
their normalisation, so every trial of a sweep reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from forde.data.pipeline import normalize

log = logging.getLogger(__name__)


@dataclass
class PCA:
    eigenvalues: torch.Tensor  # [D] float64, descending
    eigenvectors: torch.Tensor  # [D, D] float64, column d belongs to eigenvalues[d]


def covariance(inputs: torch.Tensor, mean, std, chunk: int = 2048) -> torch.Tensor:
    """Sample covariance (N-1 denominator) of normalised, flattened inputs, accumulated in float64 chunks."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    n = inputs.shape[0]
    flat = lambda s: normalize(inputs[s:s + chunk], mean_t, std_t).reshape(min(chunk, n - s), -1).double()
    total = sum(flat(s).sum(0) for s in range(0, n, chunk))
    mu = total / n
    cov = None
    for s in range(0, n, chunk):
        x = flat(s) - mu
        cov = x.T @ x if cov is None else cov.addmm_(x.T, x)
    return cov / (n - 1)


def pca_from_covariance(cov: torch.Tensor) -> PCA:
    vals, vecs = torch.linalg.eigh(cov.double())
    order = torch.argsort(vals, descending=True)
    return PCA(vals[order].clamp_min(0.0), vecs[:, order])


def compute_pca(inputs: torch.Tensor, mean, std) -> PCA:
    return pca_from_covariance(covariance(inputs, mean, std))


def fingerprint(inputs: torch.Tensor, mean, std) -> str:
    h = hashlib.sha1()
    h.update(repr((tuple(inputs.shape), str(inputs.dtype), tuple(mean), tuple(std))).encode())
    h.update(inputs.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_pca(inputs: torch.Tensor, mean, std, cache_dir: str | Path, name: str) -> PCA:
    """Load the PCA of these exact inputs from `cache_dir`, computing and saving it on a miss."""
    path = Path(cache_dir) / f"pca-{name}-{fingerprint(inputs, mean, std)}.pt"
    if path.exists():
        log.info("PCA: reusing %s", path)
        data = torch.load(path, map_location="cpu")
        return PCA(data["eigenvalues"], data["eigenvectors"])
    log.info("PCA: computing the %d-dim covariance of %d training inputs (float64)", inputs[0].numel(), len(inputs))
    pca = compute_pca(inputs, mean, std)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"eigenvalues": pca.eigenvalues, "eigenvectors": pca.eigenvectors}, tmp)
    os.replace(tmp, path)
    log.info("PCA: saved %s", path)
    return pca
