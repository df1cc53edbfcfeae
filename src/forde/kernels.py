"""FoRDE's kernel on input gradients, as pure functions.

For members i, j and batch sample b, with unit-normalised input gradients s_ib:
    d_ijb = sum_d w_d ((U^T s_ib)_d - (U^T s_jb)_d)^2,   w_d from alpha and the PCA eigenvalues lambda_d
    k_ij  = (1/B) sum_b exp(-d_ijb / h_b),               h_b = scale * median(d_..b) / ln M
The weights w are the diagonal of Sigma^-1 in the PCA basis. Mixing the precision (project page),
Sigma^-1 = (1 - alpha) I + alpha Lambda, gives w_d = (1 - alpha) + alpha lambda_d; mixing the lengthscales
(paper appendix D.4), Sigma = alpha Lambda^-1 + (1 - alpha) I, gives w_d = 1 / (alpha / lambda_d + 1 - alpha).
Both are the identity at alpha = 0 and the eigenvalues at alpha = 1, and differ in between.
The repulsion loss (1/B) sum_i log sum_j k_ij holds the j side constant, so its gradient for
member i is the Wasserstein-gradient-descent repulsion  sum_j grad_i k_ij / sum_j k_ij.

Precision: the distances between members that agree closely are small differences of large numbers, so the
kernel is computed in `kernel_dtype` (float32 at least) with autocast switched off, whatever precision the
networks run in: under bf16 autocast the projection and the distances would otherwise run in bf16 and the
repulsion's gradient would be off by tens of percent (tests/test_kernels.py).
"""

from __future__ import annotations

import contextlib
import math

import torch

MIN_BANDWIDTH = 1e-12  # guards h = 0 when every member has the same gradient at a sample


def kernel_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a kernel on `t` is computed in: t's own if wider, else float32, or float64 on CUDA while
    PyTorch is set to round float32 matrix products to TF32 (`torch.backends.cuda.matmul.allow_tf32`, which this
    project leaves off; float64 keeps the kernel exact if a user turns it on)."""
    floor = torch.float64 if t.is_cuda and torch.backends.cuda.matmul.allow_tf32 else torch.float32
    return torch.promote_types(t.dtype, floor)


@contextlib.contextmanager
def full_precision(t: torch.Tensor):
    """Autocast off for the block: the kernel's operations run in the dtypes of their inputs."""
    with torch.autocast(t.device.type, enabled=False):
        yield


def unit_normalize(g: torch.Tensor, eps: float) -> torch.Tensor:
    """s = g / sqrt(|g|^2 + eps^2) along the last dim: unit vectors that stay finite at g = 0."""
    return g * torch.rsqrt(g.square().sum(-1, keepdim=True) + eps**2)


def lengthscale_weights(eigenvalues: torch.Tensor, alpha: float, mix: str = "precision") -> torch.Tensor:
    """Distance weights w_d: identity at alpha 0, the PCA eigenvalues at 1 (see the module docstring).

    The lengthscale mix is computed as lambda / (alpha + (1 - alpha) lambda), which equals
    1 / (alpha / lambda + 1 - alpha) for lambda > 0 and takes its limit 0 at lambda = 0 (an infinite
    lengthscale) without dividing by zero; its denominator is at least alpha > 0.
    """
    if mix == "precision":
        return (1.0 - alpha) + alpha * eigenvalues
    if mix != "lengthscale":
        raise ValueError(f"unknown lengthscale mix {mix!r}; use precision or lengthscale")
    if alpha == 0.0:
        return torch.ones_like(eigenvalues)
    return eigenvalues / (alpha + (1.0 - alpha) * eigenvalues)


def projection(
    eigenvectors: torch.Tensor, eigenvalues: torch.Tensor, alpha: float, mix: str = "precision"
) -> torch.Tensor | None:
    """P = U diag(sqrt(w)), so that |(s_i - s_j) P|^2 is the weighted distance; None at alpha = 0,
    where the weighted distance is the plain one (U is orthogonal)."""
    if alpha == 0.0:
        return None
    return eigenvectors * lengthscale_weights(eigenvalues, alpha, mix).sqrt()


def pairwise_sq_dists(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """d[b, i, j] = |rows[i, b] - cols[j, b]|^2 for [M, B, D] inputs -> [B, M, M].

    Computed as |r|^2 + |c|^2 - 2 r.c with one batched matrix product, never forming the [B, M, M, D]
    differences (157 MB at M = 10, B = 128, D = 3072). Both sides are first shifted by the mean of `cols`
    over members (a constant: distances and gradients unchanged), so that |r|^2 is of the order of the
    distances themselves and the formula does not cancel when the members are close."""
    shift = cols.detach().mean(0, keepdim=True)
    r, c = (rows - shift).transpose(0, 1), (cols - shift).transpose(0, 1)  # [B, M, D]
    d = torch.baddbmm(
        (r.square().sum(-1)[:, :, None] + c.square().sum(-1)[:, None, :]), r, c.transpose(1, 2), alpha=-2.0
    )
    return d.clamp_min(0.0)


def pairwise_sq_dists_direct(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The same from the explicit differences: the reference for the matrix-product form."""
    diff = rows.transpose(0, 1).unsqueeze(2) - cols.transpose(0, 1).unsqueeze(1)
    return diff.square().sum(-1)


def median_bandwidth(d: torch.Tensor, mode: str = "all_pairs", scale: float = 1.0) -> torch.Tensor:
    """Median-heuristic bandwidth per sample from distances [B, M, M], broadcastable against them.

    all_pairs: h_b = median over all (i, j) of d_ijb / ln M (one bandwidth per sample);
    per_column: h_jb = median over i of d_ijb / ln M (one per sample and kernel column j).
    """
    m = d.shape[-1]
    med = median(d.flatten(1), dim=1).view(-1, 1, 1) if mode == "all_pairs" else median(d, dim=1).unsqueeze(1)
    return (scale * med / math.log(m)).clamp_min(MIN_BANDWIDTH)


def median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The NumPy median along `dim` (the mean of the two middle values for even counts), by one sort: no
    host synchronisation, so it can be captured in a CUDA graph."""
    n = x.shape[dim]
    ordered = x.sort(dim).values
    return (ordered.select(dim, (n - 1) // 2) + ordered.select(dim, n // 2)) / 2


def kernel_matrix(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """k_ij = mean over the batch of exp(-d_ijb / h_b): [B, M, M] -> [M, M]."""
    return torch.exp(-d / h).mean(0)


def repulsion(
    z: torch.Tensor,
    *,
    bandwidth: float | None = None,
    median_mode: str = "all_pairs",
    bandwidth_scale: float = 1.0,
    weight: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """weight * sum_i log sum_j k_ij on features z [M, B, D], j side (and bandwidth) held constant;
    weight defaults to 1/B. Computed in `kernel_dtype(z)`, autocast off."""
    weight = 1.0 / z.shape[1] if weight is None else weight
    with full_precision(z):
        z = z.to(kernel_dtype(z))
        d = pairwise_sq_dists(z, z.detach())
        d_const = d.detach()
        h = (
            torch.full_like(d_const[:, :1, :1], bandwidth)
            if bandwidth is not None
            else median_bandwidth(d_const, median_mode, bandwidth_scale)
        )
        k = kernel_matrix(d, h)
        loss = k.sum(1).log().sum() * weight
    return loss, {"bandwidth": h.mean().detach(), "kernel_offdiag": _offdiag_mean(k.detach())}


def _offdiag_mean(k: torch.Tensor) -> torch.Tensor:
    m = k.shape[0]
    if m < 2:
        return k.new_zeros(())
    return (k.sum() - k.diagonal().sum()) / (m * (m - 1))
