"""Weight-RDE, function-RDE and LIT against brute-force references with explicit loops (float64),
and the Gaussian likelihood that lets every method run the 1-D regression illustration."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import devices
from forde.config import ConfigError, MethodConfig, ModelConfig, load_config
from forde.ensemble import build_ensemble
from forde.kernels import projection, repulsion
from forde.methods.forde import FoRDE
from forde.methods.likelihoods import Categorical, Gaussian
from forde.methods.lit import LIT, squared_cosine_penalty
from forde.methods.rde_function import FunctionRDE
from forde.methods.rde_weight import WeightRDE, member_parameters

M, B, D_IN, C = 4, 6, 5, 3


def make_problem(seed, outputs=C):
    torch.manual_seed(seed)
    ens = build_ensemble(ModelConfig(name="mlp", hidden=[8, 8]), M, (D_IN,), outputs, seed).double().train()
    x = torch.randn(B, D_IN, dtype=torch.float64)
    y = torch.randint(0, C, (B,)) if outputs > 1 else torch.randn(B, dtype=torch.float64)
    return ens, x, y


def param_grads(ens, loss):
    ens.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in ens.parameters()])


def assert_same(ens, loss, ref):
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-8)
    torch.testing.assert_close(param_grads(ens, loss), param_grads(ens, ref), rtol=1e-5, atol=1e-8)


def bandwidth(dv, scale, fixed):
    """Median heuristic over all M x M entries of a plain nested list of floats."""
    return fixed if fixed is not None else scale * np.median(np.array(dv)) / math.log(M)


def data_term(outs, y, gaussian):
    if gaussian:
        return sum(
            (0.5 * (o[:, 0] - y) ** 2 / 0.3**2 + math.log(0.3) + 0.5 * math.log(2 * math.pi)).mean() for o in outs
        )
    return sum(F.cross_entropy(o, y) for o in outs)


def wgd_repulsion(d, h):
    """sum_i log sum_j exp(-d[i][j] / h) for a nested list of scalar tensors."""
    return sum(torch.log(sum(torch.exp(-d[i][j] / h) for j in range(M))) for i in range(M))


@pytest.mark.parametrize("scale,fixed", [(1.0, None), (0.5, None), (1.0, 40.0)])
def test_weight_rde_matches_brute_force(scale, fixed):
    ens, x, y = make_problem(seed=1)
    cfg = MethodConfig(name="rde_weight", bandwidth_scale=scale, bandwidth=fixed)
    loss, logits, stats = WeightRDE(cfg).loss(ens, x, y)
    assert logits.shape == (M, B, C) and {"ce", "repulsion", "bandwidth"} <= set(stats)

    outs = [m(x) for m in ens.members]
    params = [list(m.parameters()) for m in ens.members]
    d = [[None] * M for _ in range(M)]
    for i in range(M):
        for j in range(M):
            d[i][j] = sum(((pi - pj.detach()) ** 2).sum() for pi, pj in zip(params[i], params[j]))
    h = bandwidth([[v.item() for v in row] for row in d], scale, fixed)
    assert_same(ens, loss, data_term(outs, y, False) + wgd_repulsion(d, h) / B)


def test_weight_rde_gradient_is_the_wgd_repulsion():
    """The repulsion's gradient for member i is (1/B) sum_j grad_i k_ij / sum_j k_ij, k = exp(-|th_i - th_j|^2 / h)."""
    ens, x, y = make_problem(seed=2)
    cfg = MethodConfig(name="rde_weight", bandwidth=25.0)
    loss, _, _ = WeightRDE(cfg).loss(ens, x, y)
    ce = sum(F.cross_entropy(m(x), y) for m in ens.members)
    g_total, g_ce = param_grads(ens, loss), param_grads(ens, ce)
    theta = torch.stack([torch.cat([p.detach().flatten() for p in m.parameters()]) for m in ens.members])
    expected = []
    for i in range(M):
        k = torch.stack([torch.exp(-((theta[i] - theta[j]) ** 2).sum() / 25.0) for j in range(M)])
        grad_k = sum(k[j] * (-2 / 25.0) * (theta[i] - theta[j]) for j in range(M))
        expected.append(grad_k / k.sum() / B)
    torch.testing.assert_close(g_total - g_ce, torch.cat(expected), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("device", devices())
def test_kernels_and_penalty_ignore_bf16_autocast(device):
    """Under bf16 autocast every kernel (FoRDE's, the weight- and function-space ones) and LIT's penalty
    computes exactly what it computes without autocast, value and gradient."""
    ens = make_problem(seed=6)[0].float().to(device)
    g = torch.Generator().manual_seed(0)

    def close(*shape):
        return (torch.randn(shape[1:], generator=g) + 0.05 * torch.randn(shape, generator=g)).to(device)

    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    forde = FoRDE(MethodConfig(alpha=0.5), projection(u, torch.rand(16, generator=g) * 3, 0.5).to(device))
    cases = {  # a loss of one leaf tensor
        "rde_weight": (member_parameters(ens).detach(), lambda t: repulsion(t)[0]),
        "rde_function": (close(M, 1, B * C).softmax(-1), lambda t: repulsion(t)[0]),
        "forde": (close(M, B, 16), lambda t: repulsion(forde.features(t))[0]),
        "lit": (close(M, B, 16), lambda t: squared_cosine_penalty(t, 1e-12)),
    }
    for name, (leaf, loss_of) in cases.items():
        results = []
        for bf16 in (False, True):
            t = leaf.clone().requires_grad_(True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(t)
            results.append((loss, *torch.autograd.grad(loss, t)))
        (plain, g_plain), (auto, g_auto) = results
        assert auto.dtype == torch.float32, name
        assert torch.equal(auto, plain) and torch.equal(g_auto, g_plain), name


@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("scale,fixed", [(1.0, None), (2.0, None), (1.0, 0.7)])
def test_function_rde_matches_brute_force(gaussian, scale, fixed):
    ens, x, y = make_problem(seed=3, outputs=1 if gaussian else C)
    likelihood = Gaussian(0.3) if gaussian else Categorical()
    cfg = MethodConfig(name="rde_function", bandwidth_scale=scale, bandwidth=fixed)
    loss, _, _ = FunctionRDE(cfg, likelihood).loss(ens, x, y)

    outs = [m(x) for m in ens.members]
    f = [o if gaussian else o.softmax(-1) for o in outs]  # [B, K] per member
    d = [[None] * M for _ in range(M)]
    for i in range(M):
        for j in range(M):
            d[i][j] = sum(((f[i][b] - f[j][b].detach()) ** 2).sum() for b in range(B))
    h = bandwidth([[v.item() for v in row] for row in d], scale, fixed)
    assert_same(ens, loss, data_term(outs, y, gaussian) + wgd_repulsion(d, h) / B)


def member_input_gradients(ens, x, pick):
    """Per member, per sample: autograd of one scalar output w.r.t. one input row, kept differentiable."""
    outs, grads = [], []
    for member in ens.members:
        xi = x.clone().requires_grad_(True)
        out = member(xi)
        outs.append(out)
        (g,) = torch.autograd.grad(sum(pick(out, k) for k in range(B)), xi, create_graph=True)
        grads.append(g)
    return outs, grads


@pytest.mark.parametrize(
    "gaussian,target,weight", [(False, "logit", 1.0), (False, "log_prob", 0.3), (True, "logit", 2.0)]
)
def test_lit_matches_brute_force(gaussian, target, weight):
    ens, x, y = make_problem(seed=4, outputs=1 if gaussian else C)
    likelihood = Gaussian(0.3) if gaussian else Categorical(target)
    cfg = MethodConfig(name="lit", lit_weight=weight, grad_target=target)
    loss, _, stats = LIT(cfg, likelihood).loss(ens, x, y)

    def pick(out, k):
        if gaussian:
            return out[k, 0]
        return (out.log_softmax(-1) if target == "log_prob" else out)[k, y[k]]

    outs, grads = member_input_gradients(ens, x, pick)
    penalty = 0.0
    for b in range(B):
        for i in range(M):
            for j in range(i + 1, M):
                gi, gj = grads[i][b], grads[j][b]
                cos = (
                    (gi * gj).sum()
                    / torch.sqrt((gi * gi).sum() + cfg.eps**2)
                    / torch.sqrt((gj * gj).sum() + cfg.eps**2)
                )
                penalty = penalty + cos**2
    assert_same(ens, loss, data_term(outs, y, gaussian) + weight * penalty / B)
    assert stats["repulsion"].item() == pytest.approx(weight * penalty.item() / B, rel=1e-6)


def test_forde_with_gaussian_likelihood_repels_gradients_of_the_mean():
    ens, x, y = make_problem(seed=5, outputs=1)
    cfg = MethodConfig(name="forde", alpha=0.0, bandwidth_scale=1.0, median="all_pairs")  # as the loops below
    loss, outputs, stats = FoRDE(cfg, None, Gaussian(0.3)).loss(ens, x, y)
    assert outputs.shape == (M, B, 1) and "gaussian_nll" in stats

    outs, grads = member_input_gradients(ens, x, lambda out, k: out[k, 0])
    s = [[g[b] / torch.sqrt((g[b] ** 2).sum() + cfg.eps**2) for b in range(B)] for g in grads]
    d = [[[((s[i][b] - s[j][b].detach()) ** 2).sum() for b in range(B)] for j in range(M)] for i in range(M)]
    rep = 0.0
    for i in range(M):
        row = 0.0
        for j in range(M):
            for b in range(B):
                h = np.median([[d[p][q][b].item() for q in range(M)] for p in range(M)]) / math.log(M)
                row = row + torch.exp(-d[i][j][b] / h) / B
        rep = rep + torch.log(row)
    assert_same(ens, loss, data_term(outs, y, True) + rep / B)


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.lit_weight=-1", r"method.lit_weight = -1"),
        ("method.name=svgd", r"bad value for 'method.name'"),
    ],
)
def test_bad_baseline_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", [override])


@pytest.mark.parametrize("name", ["rde_weight", "rde_function"])
def test_kernel_baselines_need_two_members_unless_the_bandwidth_is_fixed(name):
    with pytest.raises(ConfigError, match=f"{name}'s median-heuristic bandwidth"):
        load_config("quickstart", [f"method.name={name}", "ensemble_size=1"])
    assert (
        load_config("quickstart", [f"method.name={name}", "ensemble_size=1", "method.bandwidth=1.0"]).ensemble_size == 1
    )
    assert load_config("quickstart", ["method.name=lit", "ensemble_size=1"]).method.name == "lit"
