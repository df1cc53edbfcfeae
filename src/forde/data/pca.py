"""PCA of the normalised, flattened training inputs: the basis and eigenvalues behind FoRDE's lengthscales.

Computed once in float64 and cached on disk, keyed by a fingerprint of the exact training inputs and
their normalisation, so every trial of a sweep reuses it.

uint8 images take an exact fast path: the Gram matrix of the pixel values shifted by -128 is a matrix
of integers, and float32 represents every integer up to 2**24 exactly. A block of 1024 images keeps
every partial sum of products (at most 1024 * 128**2 = 2**24 in size) in that range, so float32
SYRK on such blocks, accumulated in float64, gives the exact integer Gram matrix whatever the BLAS
summation order: the speed of float32 with the result of float64. Centering and normalising then
happen once, on the D x D matrix.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.linalg.blas import ssyrk
from tqdm import tqdm

from forde.config import DataConfig
from forde.data.base import Dataset
from forde.data.pipeline import normalize
from forde.data.registry import load_dataset
from forde.safe_load import first_line, torch_load

log = logging.getLogger(__name__)

EXACT_BLOCK = 1024  # images per float32 block: 1024 * 128**2 = 2**24, the largest exactly representable bound


@dataclass
class PCA:
    eigenvalues: torch.Tensor  # [D] float64, descending
    eigenvectors: torch.Tensor  # [D, D] float64, column d belongs to eigenvalues[d]


def covariance_float64(inputs: torch.Tensor, mean, std, chunk: int = 2048) -> torch.Tensor:
    """Sample covariance (N-1 denominator) of normalised, flattened inputs, all in float64 (two passes:
    mean, then centred GEMM). The plain path, for float features, and the reference of the fast path."""
    mean_t = torch.as_tensor(mean, dtype=torch.float64)
    std_t = torch.as_tensor(std, dtype=torch.float64)
    n = inputs.shape[0]
    flat = lambda s: normalize(inputs[s:s + chunk], mean_t, std_t, torch.float64).reshape(min(chunk, n - s), -1)
    mu = sum(flat(s).sum(0) for s in range(0, n, chunk)) / n
    cov = None
    for s in range(0, n, chunk):
        x = flat(s) - mu
        cov = x.T @ x if cov is None else cov.addmm_(x.T, x)
    return cov / (n - 1)


def covariance_uint8(images: torch.Tensor, std, block: int = EXACT_BLOCK) -> torch.Tensor:
    """The same covariance for uint8 [N, C, H, W] images, exact (see the module docstring).

    The channel means drop out of a covariance; only the per-channel std scales it."""
    if block > EXACT_BLOCK:
        raise ValueError(f"block = {block}: float32 sums stay exact only up to {EXACT_BLOCK} images")
    n = images.shape[0]
    flat = images.reshape(n, -1).numpy()
    d = flat.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64)  # lower triangle: sum_i (x_i - 128)(x_i - 128)^T
    out = np.zeros((d, d), dtype=np.float32, order="F")  # SYRK writes its upper triangle here
    sums = np.zeros(d, dtype=np.int64)
    for s in tqdm(range(0, n, block), desc="PCA covariance", unit="block"):
        x = flat[s:s + block]
        sums += x.sum(0, dtype=np.int64)
        shifted = x.astype(np.float32)
        shifted -= 128.0
        ssyrk(1.0, shifted.T, beta=0.0, c=out, trans=0, lower=0, overwrite_c=1)  # shifted^T shifted
        gram.add_(torch.from_numpy(out.T))  # F-order upper triangle = C-order lower triangle
    # in place from here on (at D = 12288 every D x D temporary costs 1.2 GB); only the lower triangle
    # is meaningful until it is mirrored at the end, which also makes the result exactly symmetric
    centred = torch.from_numpy(sums - 128 * n).double()  # sum_i (x_i - 128), exact
    cov = gram.addr_(centred, centred, alpha=-1.0 / n).div_(n - 1)
    pixel_std = torch.as_tensor(std, dtype=torch.float64).repeat_interleave(d // len(std)) * 255.0
    cov.div_(pixel_std[:, None]).div_(pixel_std[None, :]).tril_()
    return cov.add_(cov.tril(-1).T)


def covariance(inputs: torch.Tensor, mean, std) -> torch.Tensor:
    """Sample covariance (N-1 denominator) of the normalised, flattened inputs, float64 [D, D]."""
    if inputs.dtype == torch.uint8 and inputs.dim() == 4:
        return covariance_uint8(inputs, std)
    return covariance_float64(inputs, mean, std)


def pca_from_covariance(cov: torch.Tensor) -> PCA:
    vals, vecs = torch.linalg.eigh(cov.double())  # ascending
    return PCA(vals.flip(0).clamp_min(0.0), vecs.flip(1))


def compute_pca(inputs: torch.Tensor, mean, std) -> PCA:
    return pca_from_covariance(covariance(inputs, mean, std))


def fingerprint(inputs: torch.Tensor, mean, std) -> str:
    """Hash of the exact inputs and their normalisation; the buffer is hashed in place, without a copy."""
    h = hashlib.sha1()
    h.update(repr((tuple(inputs.shape), str(inputs.dtype), tuple(mean), tuple(std))).encode())
    h.update(inputs.contiguous().numpy().reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def cached_pca(inputs: torch.Tensor, mean, std, cache_dir: str | Path, name: str) -> PCA:
    """Load the PCA of these exact inputs from `cache_dir`, computing and saving it on a miss.

    A lock file makes concurrent callers (the parallel workers of a sweep) wait for one computation
    instead of each running their own."""
    path = Path(cache_dir) / f"pca-{name}-{fingerprint(inputs, mean, std)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = read_cache(path, inputs[0].numel()) if path.exists() else None
        if cached is not None:
            log.info("PCA: reusing %s", path)
            return cached
        log.info("PCA: computing the %d-dim covariance of %d training inputs", inputs[0].numel(), len(inputs))
        pca = compute_pca(inputs, mean, std)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"eigenvalues": pca.eigenvalues, "eigenvectors": pca.eigenvectors}, tmp)
        os.replace(tmp, path)
        log.info("PCA: saved %s", path)
        return pca


def read_cache(path: Path, dim: int) -> PCA | None:
    """A cached PCA, loaded without running code (tensors only); None, with a warning, when the file is
    damaged or holds anything else, so that it is computed again and replaced."""
    try:
        data = torch_load(path)
        values, vectors = data["eigenvalues"], data["eigenvectors"]
        tensors = isinstance(values, torch.Tensor) and isinstance(vectors, torch.Tensor)
        if not (tensors and values.shape == (dim,) and vectors.shape == (dim, dim)
                and values.dtype == vectors.dtype == torch.float64):
            raise ValueError(f"expected float64 eigenvalues [{dim}] and eigenvectors [{dim}, {dim}]")
    except Exception as err:  # a cut-short file, a file of another kind, or one that would run code when unpickled
        log.warning("PCA: the cache %s is unusable (%s); computing it again", path, first_line(err))
        return None
    return PCA(values, vectors)


def dataset_pca(ds: Dataset, root: str | Path) -> PCA:
    """The PCA of a dataset's whole training split (data.train_subset does not change it, as the release
    computes it on every training image), cached under <data.root>/pca/: what training uses."""
    full = ds.full
    return cached_pca(full.train.inputs, full.mean, full.std, Path(root) / "pca", full.name)


def run_pca_command(cfg: DataConfig, top: int = 10) -> PCA:
    """`forde data pca`: compute (or reuse) the dataset's PCA cache and log its top eigenvalues."""
    ds = load_dataset(cfg)
    pca = dataset_pca(ds, cfg.root)
    share = pca.eigenvalues / pca.eigenvalues.sum()
    log.info("PCA of %s (%d training inputs, D = %d): top %d eigenvalues %s; they explain %.1f%% of the variance",
             ds.name, len(ds.train), len(pca.eigenvalues), top,
             ", ".join(f"{v:.4g}" for v in pca.eigenvalues[:top].tolist()), 100 * share[:top].sum().item())
    return pca
