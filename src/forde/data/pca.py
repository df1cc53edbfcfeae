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
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import cast, get_args

import numpy as np
import torch
from scipy.linalg.blas import ssyrk
from tqdm import tqdm

from forde.config import AlphaMix
from forde.data.base import Dataset
from forde.data.pipeline import normalize
from forde.errors import one_line
from forde.kernels import projection
from forde.safe_load import torch_load

log = logging.getLogger(__name__)

EXACT_BLOCK = 1024  # images per float32 block: 1024 * 128**2 = 2**24, the largest exactly representable bound
MAX_FEATURES = 2**15  # the D x D float64 covariance takes 8 GiB here (Tiny-ImageNet's D = 12288: 1.2 GiB)


@dataclass
class PCA:
    """The principal components of the training inputs, both float64.

    Attributes:
        eigenvalues: `[D]`, the variances along the components, descending.
        eigenvectors: `[D, D]`; column d is the component of `eigenvalues[d]`.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


def covariance_float64(inputs: torch.Tensor, mean, std, chunk: int = 2048) -> torch.Tensor:
    """Sample covariance (N-1 denominator) of normalised, flattened inputs, all in float64 (two passes:
    mean, then centred GEMM). The plain path, for float features, and the reference of the fast path."""
    mean_t = torch.as_tensor(mean, dtype=torch.float64)
    std_t = torch.as_tensor(std, dtype=torch.float64)
    n = inputs.shape[0]

    def flat(s):
        return normalize(inputs[s : s + chunk], mean_t, std_t, torch.float64).reshape(min(chunk, n - s), -1)

    mu = sum(flat(s).sum(0) for s in range(0, n, chunk)) / n
    cov: torch.Tensor | None = None
    for s in range(0, n, chunk):
        x = flat(s) - mu
        cov = x.T @ x if cov is None else cov.addmm_(x.T, x)
    assert cov is not None, "no inputs"
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
        x = flat[s : s + block]
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


def input_pca(
    inputs: torch.Tensor | Iterable, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> PCA:
    """The PCA of the training inputs as the members see them, computed as `forde train` computes it.

    Args:
        inputs: The training inputs: a tensor `[N, ...]`, a `torch.utils.data.Dataset` whose samples are inputs
            or `(input, target, ...)` tuples, or any other iterable of such batches (a `DataLoader`). Float inputs
            are used as they are: pass them exactly as the members receive them (normalised, not augmented).
            uint8 images `[N, C, H, W]` take the training pipeline's exact fast path and need `mean` and `std`.
        mean: Per-channel mean of uint8 images scaled to [0, 1]; the members see `(x / 255 - mean) / std`.
        std: Per-channel standard deviation, as `mean`.

    Returns:
        The eigendecomposition of the inputs' covariance (flattened per sample, N - 1 denominator).

    Raises:
        ValueError: Inputs that are not a tensor or samples of one, fewer than 2 of them, more than
            `MAX_FEATURES` features per sample, or `mean`/`std` missing for uint8 images (or given for float inputs).
    """
    x = stacked_inputs(inputs)
    if len(x) < 2:
        raise ValueError(f"a PCA needs at least 2 training inputs, got {len(x)}")
    features = x[0].numel()
    if features > MAX_FEATURES:
        raise ValueError(
            f"inputs of {features} features per sample: their PCA needs a {features} x {features} float64 "
            f"matrix ({features**2 * 8 / 2**30:.0f} GiB); use the identity kernel (projection=None) or "
            f"smaller inputs (at most {MAX_FEATURES} features)"
        )
    if x.dtype == torch.uint8:
        if x.dim() != 4 or mean is None or std is None or not len(mean) == len(std) == x.shape[1]:
            raise ValueError(
                f"uint8 inputs {tuple(x.shape)}: pass images [N, C, H, W] with mean= and std=, C values "
                "each, the normalisation (x / 255 - mean) / std the members see; or pass the float inputs"
            )
        return compute_pca(x, tuple(mean), tuple(std))
    if mean is not None or std is not None:
        raise ValueError(
            "mean= and std= describe uint8 images; float inputs are used as given, so pass them "
            "normalised as the members see them and leave out mean and std"
        )
    return compute_pca(x.float() if not x.is_floating_point() else x, (0.0,), (1.0,))


def stacked_inputs(inputs: torch.Tensor | Iterable) -> torch.Tensor:
    """A tensor of inputs (CPU) from a tensor, a dataset of samples, or any other iterable of batches."""

    def first(item):
        return torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item).detach().cpu()

    if isinstance(inputs, torch.Tensor):
        return inputs.detach().cpu()
    try:
        if isinstance(inputs, torch.utils.data.IterableDataset):
            return torch.stack([first(sample) for sample in inputs])
        if isinstance(inputs, torch.utils.data.Dataset):
            # a map-style dataset without __len__ raises TypeError here, reported below
            return torch.stack([first(inputs[i]) for i in range(len(cast(Sized, inputs)))])
        return torch.cat([first(batch) for batch in inputs])
    except (TypeError, RuntimeError) as err:
        raise ValueError(
            f"training inputs: expected a tensor, a dataset of samples or an iterable of batches, each "
            f"an input tensor or an (input, target) pair; got {type(inputs).__name__} ({err})"
        ) from None


def pca_projection(
    inputs: torch.Tensor | Iterable | PCA,
    alpha: float = 1.0,
    mix: AlphaMix = "precision",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor | None:
    r"""FoRDE's lengthscales from the PCA of the training inputs: the `projection` of `FoRDELoss`.

    The kernel compares the members' unit-normalised input gradients $s$ by the distance
    $\sum_d w_d \left((U^\top s_i)_d - (U^\top s_j)_d\right)^2$, $U$ the principal components and $w_d$ weights from
    their variances $\lambda_d$: $w = 1$ (identity) at $\alpha = 0$ and $w = \lambda$ at $\alpha = 1$, so that
    directions in which the data vary much count more. This returns $P = U \operatorname{diag}(\sqrt{w})$, with
    which that distance is $\lVert s_i P - s_j P \rVert^2$.

    Args:
        inputs: The training inputs (see `input_pca`), or a `PCA` already computed from them (to try several
            alphas without computing it again).
        alpha: The mix between identity (0) and PCA (1) lengthscales, in [0, 1]; `method.alpha` in configs.
        mix: `"precision"` mixes the inverse covariance, $w = (1 - \alpha) + \alpha \lambda$ (the default, as the
            project page); `"lengthscale"` mixes the covariance, $w = 1 / (\alpha / \lambda + 1 - \alpha)$ (paper
            appendix D.4). `method.alpha_mix` in configs.
        mean: For uint8 images, see `input_pca`.
        std: For uint8 images, see `input_pca`.

    Returns:
        P, float32 `[D, D]` on the CPU (`FoRDELoss` moves it to the gradients' device), or None at alpha = 0:
        the identity kernel, for which no PCA is computed.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha!r}: must lie in [0, 1] (0 = identity, 1 = PCA lengthscales)")
    if mix not in get_args(AlphaMix):
        raise ValueError(f"mix = {mix!r}: use {' or '.join(get_args(AlphaMix))}")
    if alpha == 0.0:
        return None
    pca = inputs if isinstance(inputs, PCA) else input_pca(inputs, mean=mean, std=std)
    p = projection(pca.eigenvectors, pca.eigenvalues, alpha, mix)
    assert p is not None  # alpha > 0
    return p.float()


def fingerprint(inputs: torch.Tensor, mean, std) -> str:
    """Hash of the exact inputs and their normalisation; the buffer is hashed in place, without a copy."""
    h = hashlib.sha1()
    h.update(repr((tuple(inputs.shape), str(inputs.dtype), tuple(mean), tuple(std))).encode())
    h.update(inputs.contiguous().numpy().reshape(-1).view(np.uint8).data)
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
        if not (
            tensors
            and values.shape == (dim,)
            and vectors.shape == (dim, dim)
            and values.dtype == vectors.dtype == torch.float64
        ):
            raise ValueError(f"expected float64 eigenvalues [{dim}] and eigenvectors [{dim}, {dim}]")
    except Exception as err:  # a cut-short file, a file of another kind, or one that would run code when unpickled
        log.warning("PCA: the cache %s is unusable (%s); computing it again", path, one_line(err))
        return None
    return PCA(values, vectors)


def dataset_pca(ds: Dataset, root: str | Path) -> PCA:
    """The PCA of a dataset's whole training split (data.train_subset does not change it, as the release
    computes it on every training image), cached under <data.root>/pca/: what training uses."""
    full = ds.full
    return cached_pca(full.train.inputs, full.mean, full.std, Path(root) / "pca", full.name)
