"""FoRDE's kernel, bandwidth and repulsion gradient against a brute-force reference with explicit loops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import devices
from forde.config import MethodConfig, ModelConfig
from forde.data.pca import compute_pca
from forde.ensemble import build_ensemble
from forde.kernels import (
    lengthscale_weights,
    median,
    median_bandwidth,
    pairwise_sq_dists,
    pairwise_sq_dists_direct,
    projection,
    repulsion,
    unit_normalize,
)
from forde.methods.forde import FoRDE

M, B, D_IN, C = 4, 6, 12, 3


def random_pca(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.rand(d, generator=g, dtype=torch.float64).mul(3).sort(descending=True).values
    return q, lam


def reference_loss(ensemble, x, y, U, lam, alpha, eps, target, mode, scale, fixed, mix="precision"):
    """Plain loops: one member, one pair, one sample at a time, float64 throughout."""
    m, b = len(ensemble), len(y)
    logits, grads = [], []
    for member in ensemble.members:
        xi = x.clone().requires_grad_(True)
        out = member(xi)
        logits.append(out)
        sel = out.log_softmax(-1) if target == "log_prob" else out
        (g,) = torch.autograd.grad(sum(sel[k, y[k]] for k in range(b)), xi, create_graph=True)
        grads.append(g.reshape(b, -1))
    if mix == "precision":  # Sigma^-1 = (1 - alpha) I + alpha Lambda
        w = (1 - alpha) + alpha * lam
    else:  # Sigma = alpha Lambda^-1 + (1 - alpha) I, inverted entry by entry
        w = torch.stack([1.0 / (alpha / lam_i + (1 - alpha)) for lam_i in lam])
    z = [[None] * b for _ in range(m)]
    for i in range(m):
        for k in range(b):
            g = grads[i][k]
            s = g / torch.sqrt((g * g).sum() + eps**2)
            z[i][k] = U.T @ s
    d = [[[None] * b for _ in range(m)] for _ in range(m)]
    for i in range(m):
        for j in range(m):
            for k in range(b):
                diff = z[i][k] - z[j][k].detach()
                d[i][j][k] = (w * diff * diff).sum()
    dv = np.array([[[d[i][j][k].item() for k in range(b)] for j in range(m)] for i in range(m)])  # [i, j, b]
    ce = sum(F.cross_entropy(lg, y) for lg in logits)
    rep = 0.0
    for i in range(m):
        row = 0.0
        for j in range(m):
            kij = 0.0
            for k in range(b):
                if fixed is not None:
                    h = fixed
                elif mode == "all_pairs":
                    h = scale * np.median(dv[:, :, k]) / math.log(m)
                else:
                    h = scale * np.median(dv[:, j, k]) / math.log(m)
                kij = kij + torch.exp(-d[i][j][k] / h)
            row = row + kij / b
        rep = rep + torch.log(row)
    return ce + rep / b


def make_problem(seed):
    torch.manual_seed(seed)
    ens = build_ensemble(ModelConfig(name="mlp", hidden=[16, 16]), M, (D_IN,), C, seed).double().train()
    x = torch.randn(B, D_IN, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    return ens, x, y


def param_grads(ens, loss):
    ens.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in ens.parameters()])


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("target", ["logit", "log_prob"])
def test_forde_loss_and_gradient_match_brute_force(alpha, target):
    ens, x, y = make_problem(seed=int(alpha * 10) + len(target))
    U, lam = random_pca(D_IN, seed=3)
    cfg = MethodConfig(name="forde", alpha=alpha, grad_target=target, eps=1e-12, bandwidth_scale=1.0)
    method = FoRDE(cfg, projection(U, lam, alpha))
    loss, logits, _ = method.loss(ens, x, y)
    ref = reference_loss(ens, x, y, U, lam, alpha, cfg.eps, target, cfg.median, 1.0, None)
    assert logits.shape == (M, B, C)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-8)
    g_fast, g_ref = param_grads(ens, loss), param_grads(ens, ref)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("alpha", [0.2, 0.7])
def test_lengthscale_mix_matches_brute_force(alpha):
    ens, x, y = make_problem(seed=11)
    U, lam = random_pca(D_IN, seed=5)
    cfg = MethodConfig(name="forde", alpha=alpha, alpha_mix="lengthscale")
    loss, _, _ = FoRDE(cfg, projection(U, lam, alpha, "lengthscale")).loss(ens, x, y)
    ref = reference_loss(ens, x, y, U, lam, alpha, cfg.eps, "logit", cfg.median, 1.0, None, mix="lengthscale")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(param_grads(ens, loss), param_grads(ens, ref), rtol=1e-5, atol=1e-8)


def test_the_two_mixes_agree_at_zero_and_one_only():
    lam = torch.tensor([7.0, 2.0, 1.0, 0.3, 1e-9, 0.0], dtype=torch.float64)
    for alpha in (0.0, 1.0):
        torch.testing.assert_close(
            lengthscale_weights(lam, alpha, "lengthscale"), lengthscale_weights(lam, alpha, "precision")
        )
    for alpha in (0.1, 0.5, 0.9):
        precision, lengthscale = (
            lengthscale_weights(lam, alpha, "precision"),
            lengthscale_weights(lam, alpha, "lengthscale"),
        )
        # 1 / (a / l + 1 - a) written out, where lambda > 0; its limit 0 at lambda = 0 (an infinite lengthscale)
        expected = [1.0 / (alpha / lam_i + (1 - alpha)) if lam_i > 0 else 0.0 for lam_i in lam.tolist()]
        torch.testing.assert_close(lengthscale, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
        assert torch.isfinite(lengthscale).all()
        differ = (precision - lengthscale).abs() > 1e-6  # equal only where lambda = 1 (both give 1)
        assert differ.tolist() == [lam_i != 1.0 for lam_i in lam.tolist()]


@pytest.mark.parametrize(
    "mode,scale,fixed", [("per_column", 1.0, None), ("all_pairs", 0.5, None), ("all_pairs", 1.0, 0.3)]
)
def test_bandwidth_variants_match_brute_force(mode, scale, fixed):
    ens, x, y = make_problem(seed=7)
    U, lam = random_pca(D_IN, seed=4)
    cfg = MethodConfig(name="forde", alpha=0.4, median=mode, bandwidth_scale=scale, bandwidth=fixed)
    loss, _, _ = FoRDE(cfg, projection(U, lam, 0.4)).loss(ens, x, y)
    ref = reference_loss(ens, x, y, U, lam, 0.4, cfg.eps, "logit", mode, scale, fixed)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(param_grads(ens, loss), param_grads(ens, ref), rtol=1e-5, atol=1e-8)


def test_repulsion_gradient_is_the_wgd_direction():
    """d/dz_i of the loss equals (1/B) sum_j grad_i k_ij / sum_j k_ij, with k's j side constant."""
    z = torch.randn(M, B, 5, dtype=torch.float64, requires_grad=True)
    loss, stats = repulsion(z, bandwidth=0.7)
    (g,) = torch.autograd.grad(loss, z)
    zz = z.detach()
    expected = torch.zeros_like(zz)
    for i in range(M):
        kij = torch.stack([torch.exp(-((zz[i] - zz[j]) ** 2).sum(-1) / 0.7) for j in range(M)])  # [M, B]
        denom = kij.mean(1).sum()
        for j in range(M):
            # grad of mean_b exp(-|z_ib - z_jb|^2 / h) w.r.t. z_ib
            expected[i] += (kij[j][:, None] * (-2 / 0.7) * (zz[i] - zz[j])) / B / denom
    torch.testing.assert_close(g, expected / B)


def test_identity_kernel_is_plain_distance_of_unit_vectors():
    g = torch.randn(M, B, 7, dtype=torch.float64)
    s = unit_normalize(g, 1e-12)
    torch.testing.assert_close(s.norm(dim=-1), torch.ones(M, B, dtype=torch.float64))
    assert projection(torch.eye(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64), 0.0) is None
    proj = projection(torch.eye(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64) * 5, 1e-300)
    d = pairwise_sq_dists(s @ proj, s @ proj)
    for i in range(M):
        for j in range(M):
            torch.testing.assert_close(d[:, i, j], ((s[i] - s[j]) ** 2).sum(-1))
    assert torch.isfinite(unit_normalize(torch.zeros(2, 3), 1e-12)).all()


def test_alpha_one_weights_are_pca_eigenvalues_of_known_covariance():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    true_vals = torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    cov = q @ torch.diag(true_vals) @ q.T
    samples = torch.randn(200_000, 6, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    pca = compute_pca(samples.float(), mean=torch.zeros(6), std=torch.ones(6))
    torch.testing.assert_close(pca.eigenvalues, true_vals, rtol=0.02, atol=0.01)
    torch.testing.assert_close(lengthscale_weights(pca.eigenvalues, 1.0), pca.eigenvalues)
    torch.testing.assert_close(lengthscale_weights(pca.eigenvalues, 0.0), torch.ones(6, dtype=torch.float64))
    # weighted distance through the projection equals the Mahalanobis-style form sum_d w_d (u_d . delta)^2
    a, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    p = projection(pca.eigenvectors, pca.eigenvalues, 1.0)
    direct = sum(pca.eigenvalues[k] * (pca.eigenvectors[:, k] @ (a - b)) ** 2 for k in range(6))
    torch.testing.assert_close(((a - b) @ p).square().sum(), direct)


def test_median_bandwidth_is_numpy_median_over_log_m():
    d = torch.rand(3, 4, 4, dtype=torch.float64)
    h = median_bandwidth(d, "all_pairs", scale=2.0)
    for k in range(3):
        assert h[k, 0, 0].item() == pytest.approx(2.0 * np.median(d[k].numpy()) / math.log(4))
    h = median_bandwidth(d, "per_column")
    assert h.shape == (3, 1, 4)
    assert h[1, 0, 2].item() == pytest.approx(np.median(d[1, :, 2].numpy()) / math.log(4))


def test_matrix_product_distances_match_explicit_differences_in_float32():
    """The fast form against the direct one on PCA-weighted unit vectors of realistic size (D = 3072, weights
    up to 600): values to float32 rounding of |z|^2, gradients w.r.t. the live side to 1e-4 relative."""
    g = torch.Generator().manual_seed(0)
    s = unit_normalize(torch.randn(10, 32, 3072, generator=g), 1e-12)
    w = torch.logspace(-4, torch.log10(torch.tensor(600.0)).item(), 3072)
    z = (s * w.sqrt()).requires_grad_(True)
    fast, direct = pairwise_sq_dists(z, z.detach()), pairwise_sq_dists_direct(z, z.detach())
    scale = z.detach().square().sum(-1).max()
    assert (fast - direct).abs().max() <= 1e-5 * scale
    upstream = torch.rand(fast.shape, generator=g)
    (g_fast,) = torch.autograd.grad(fast, z, upstream)
    (g_direct,) = torch.autograd.grad(direct, z, upstream)
    torch.testing.assert_close(g_fast, g_direct, rtol=1e-4, atol=1e-4 * g_direct.abs().max().item())


def test_median_is_numpy_median_for_odd_and_even_counts():
    for n in (1, 4, 9, 100):
        x = torch.rand(3, n, dtype=torch.float64)
        torch.testing.assert_close(median(x, 1), torch.from_numpy(np.median(x.numpy(), axis=1)))


def close_members_problem(device: str, alpha: float):
    """What trained members look like to the kernel (M = 10, B = 32, D = 3072): input gradients that share a
    common direction per sample, and a PCA whose power-law eigenvalues sum to D (an orthogonal DCT basis as U)."""
    m, b, d = 10, 32, 3072
    g = torch.Generator().manual_seed(0)
    common = torch.randn(1, b, d, generator=g, dtype=torch.float64)
    grads = common + 0.1 * torch.randn(m, b, d, generator=g, dtype=torch.float64)
    k = torch.arange(d, dtype=torch.float64)
    u = torch.cos(math.pi / d * (k[:, None] + 0.5) * k[None, :]) * math.sqrt(2 / d)
    u[:, 0] /= math.sqrt(2)
    lam = 1.0 / (k + 1)
    return grads.to(device), projection(u, lam * d / lam.sum(), alpha)


def repulsion_grad(grads: torch.Tensor, proj, dtype: torch.dtype, bf16: bool) -> torch.Tensor:
    method = FoRDE(MethodConfig(alpha=0.5), None if proj is None else proj.to(grads.device, dtype))
    g = grads.to(dtype).requires_grad_(True)
    with torch.autocast(grads.device.type, dtype=torch.bfloat16, enabled=bf16):
        rep, _ = repulsion(method.features(g))
    return torch.autograd.grad(rep, g)[0].double()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_repulsion_gradient_under_bf16_autocast_stays_within_half_a_percent(device, alpha):
    """bf16 networks hand float32 input gradients to the kernel; with the kernel in bf16, the repulsion's gradient
    was off by 3% (alpha 0) to 40% (alpha 0.2 and 1) here. On CUDA also with TF32 matrix products switched on."""
    grads, proj = close_members_problem(device, alpha)
    exact = repulsion_grad(grads, proj, torch.float64, bf16=False)
    fp32 = repulsion_grad(grads, proj, torch.float32, bf16=False)
    previous = torch.backends.cuda.matmul.allow_tf32
    for allow_tf32 in [False, True] if device == "cuda" else [False]:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            bf16 = repulsion_grad(grads, proj, torch.float32, bf16=True)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        for ref in (fp32, exact):
            assert ((bf16 - ref).norm() / ref.norm()).item() <= 0.005, allow_tf32
