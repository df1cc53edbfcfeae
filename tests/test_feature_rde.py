"""Feature-RDE against the authors' update written out by hand (float64, NumPy for the projection and the kernel):
dL/dF_i = [G_i + Cauchy prior gradient + projected kernel gradient] / B, carried into each encoder by its own
vector-Jacobian product; the shared classifier learns from the members' mean cross-entropy."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forde.config import ConfigError, MethodConfig, ModelConfig, load_config
from forde.ensemble import Ensemble, build_ensemble
from forde.methods.rde_feature import FeatureRDE

M, B, D_IN, H, C = 4, 6, 5, 7, 3


def make_problem(seed: int, shared: bool, dim: int, scale: float = 1e-3):
    torch.manual_seed(seed)
    ens = build_ensemble(ModelConfig(name="mlp", hidden=[8, H]), M, (D_IN,), C, seed).double().train()
    method = FeatureRDE(
        MethodConfig(
            name="rde_feature", feature_shared_head=shared, feature_projection_dim=dim, feature_prior_scale=scale
        )
    )
    method.attach(ens)
    x = torch.randn(B, D_IN, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    return ens, method, x, y


def reference_feature_gradients(feats: list[np.ndarray], heads: list[tuple], y: np.ndarray, dim: int, scale: float):
    """The authors' feature gradient, step by step: [M] arrays dL/dF_i of shape [B, H], and the loss's value."""
    onehot = np.eye(C)[y]
    probs = []
    for f, (w, b) in zip(feats, heads):
        logits = f @ w.T + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(p / p.sum(1, keepdims=True))
    G = np.stack([(p - onehot) @ w for p, (w, _) in zip(probs, heads)]).reshape(M, -1)  # d sum_b CE / dF
    Fm = np.stack(feats).reshape(M, -1)
    evals, evecs = np.linalg.eigh(G @ G.T)
    basis = np.stack([sum(evecs[i, j] * G[i] for i in range(M)) / math.sqrt(evals[j]) for j in range(M)])[:dim]
    z = Fm @ basis.T
    d = np.array([[((z[p] - z[q]) ** 2).sum() for q in range(M)] for p in range(M)])
    h = np.array([np.median(d[p]) ** 2 / math.log(M) + 1e-12 for p in range(M)])
    k = np.exp(-d / h[:, None])
    kernel_grad = np.stack(
        [sum(-2.0 / h[p] * k[p, q] * (z[p] - z[q]) for q in range(M)) / k[p].sum() for p in range(M)]
    )
    grads = (G + 2 * scale * Fm / (1 + scale * Fm**2) + kernel_grad @ basis) / B
    ce = sum(-np.log(p[np.arange(B), y]).mean() for p in probs)
    loss = ce + (np.log1p(scale * Fm**2).sum() + np.log(k.sum(1)).sum()) / B
    return grads.reshape(M, B, -1), loss, probs


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dim,scale", [(5, 1e-3), (2, 0.5)])
def test_feature_rde_matches_the_authors_update(shared, dim, scale):
    ens, method, x, y = make_problem(seed=1, shared=shared, dim=dim, scale=scale)
    heads = [m.net[-1] for m in ens.members]
    assert all(h is heads[0] for h in heads) == shared
    loss, outputs, stats = method.loss(ens, x, y)
    assert outputs.shape == (M, B, C) and {"ce", "repulsion", "feature_prior", "bandwidth"} <= set(stats)
    ens.zero_grad()
    loss.backward()

    feats = [m.net[:-1](x) for m in ens.members]  # the same train-mode pass, without the method's hooks
    np_heads = [(h.weight.detach().numpy(), h.bias.detach().numpy()) for h in heads]
    grads, ref_loss, probs = reference_feature_gradients(
        [f.detach().numpy() for f in feats], np_heads, y.numpy(), dim, scale
    )
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    for i, (member, f) in enumerate(zip(ens.members, feats)):
        encoder = list(member.net[:-1].parameters())
        expected = torch.autograd.grad(f, encoder, grad_outputs=torch.from_numpy(grads[i]))
        for p, g in zip(encoder, expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    onehot = np.eye(C)[y.numpy()]
    head_w = [(p - onehot).T @ f.detach().numpy() / B for p, f in zip(probs, feats)]  # d mean_b CE_i / dW
    head_b = [(p - onehot).mean(0) for p in probs]
    if shared:
        head_w, head_b = [sum(head_w) / M] * M, [sum(head_b) / M] * M
    for h, w, b in zip(heads, head_w, head_b):
        torch.testing.assert_close(h.weight.grad, torch.from_numpy(w), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(h.bias.grad, torch.from_numpy(b), rtol=1e-9, atol=1e-12)


def test_a_zero_classifier_gives_a_finite_first_step():
    """All classifier gradients vanish (zero-initialised head, as the release's networks start): no 1/sqrt(0)."""
    ens, method, x, y = make_problem(seed=2, shared=True, dim=5)
    nn.init.zeros_(ens.members[0].net[-1].weight)
    loss, _, _ = method.loss(ens, x, y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in ens.parameters())


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D_IN, C)

    def forward(self, x):
        return 2 * self.fc(x)


def test_networks_it_cannot_read_are_one_line():
    method = FeatureRDE(MethodConfig(name="rde_feature"))
    with pytest.raises(ConfigError, match="has no nn.Linear"):
        method.attach(Ensemble([nn.Sequential(nn.Flatten()), nn.Sequential(nn.Flatten())]))
    ens = Ensemble([Scaled(), Scaled()])
    method.attach(ens)
    with pytest.raises(ConfigError, match="not the output of its last nn.Linear"):
        method.loss(ens, torch.randn(B, D_IN), torch.randint(0, C, (B,)))
    with pytest.raises(ConfigError, match="model.execution"):
        load_config("quickstart", ["method.name=rde_feature", "model.execution=vmap"])


def test_a_shared_head_checkpoint_loads_into_a_fresh_ensemble():
    """The shared classifier is saved under every member's name and loads back shared."""
    ens, method, x, y = make_problem(seed=3, shared=True, dim=5)
    loss, _, _ = method.loss(ens, x, y)
    loss.backward()
    with torch.no_grad():
        for p in ens.parameters():
            p.sub_(0.1 * p.grad)
    fresh, fresh_method, _, _ = make_problem(seed=4, shared=True, dim=5)
    fresh.load_state_dict(ens.state_dict())
    assert fresh.members[1].net[-1] is fresh.members[0].net[-1]
    for a, b in zip(ens.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert F.mse_loss(fresh(x), ens(x)).item() == 0.0
