"""FoRDE's cheaper approximations: repulsion every k-th step, and the kernel on a subset of the batch."""

import copy

import pytest
import torch

from forde.config import MethodConfig, ModelConfig
from forde.ensemble import build_ensemble
from forde.kernels import projection
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE

M, B, D_IN, C = 3, 8, 10, 4


@pytest.fixture
def problem():
    torch.manual_seed(0)
    ens = build_ensemble(ModelConfig(name="mlp", hidden=[16]), M, (D_IN,), C, seed=0).double().train()
    x, y = torch.randn(B, D_IN, dtype=torch.float64), torch.randint(0, C, (B,))
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, dtype=torch.float64))
    return ens, x, y, projection(q, torch.rand(D_IN, dtype=torch.float64) * 2, 0.5)


def test_every_kth_step_is_plain_between_and_k_times_repulsion_on_it(problem):
    ens, x, y, proj = problem
    full = FoRDE(MethodConfig(alpha=0.5), proj)
    every3 = FoRDE(MethodConfig(alpha=0.5, repulsion_every=3), proj)
    de_loss, _, _ = DeepEnsemble().loss(ens, x, y)
    for step in (1, 2, 4, 5):
        loss, _, stats = every3.loss(ens, x, y, step=step)
        assert loss.item() == pytest.approx(de_loss.item()) and "repulsion" not in stats
    loss_full, _, s_full = full.loss(ens, x, y, step=0)
    for step in (0, 3, 6):
        loss, _, stats = every3.loss(ens, x, y, step=step)
        assert stats["repulsion"].item() == pytest.approx(3 * s_full["repulsion"].item())
        assert loss.item() == pytest.approx(de_loss.item() + 3 * s_full["repulsion"].item())


def test_subset_kernel_uses_a_separate_pass_and_leaves_running_stats_alone(problem):
    ens, x, y, proj = problem
    k = 4
    method = FoRDE(MethodConfig(alpha=0.5, repulsion_subset=k / B), proj)
    before = copy.deepcopy(ens.state_dict())
    loss, _, stats = method.loss(ens, x, y)
    # reference: data term on the whole batch, kernel from a train-mode pass over x[:k], weighted 1/B
    ref_ens = build_ensemble(ModelConfig(name="mlp", hidden=[16]), M, (D_IN,), C, seed=0).double().train()
    ref_ens.load_state_dict(before)
    de_loss, _, _ = DeepEnsemble().loss(ref_ens, x, y)
    after_full_pass = copy.deepcopy(ref_ens.state_dict())
    sub = FoRDE(MethodConfig(alpha=0.5), proj)
    _, _, s_sub = sub.loss(ref_ens, x[:k], y[:k])
    assert stats["repulsion"].item() == pytest.approx(s_sub["repulsion"].item() * k / B)
    assert loss.item() == pytest.approx(de_loss.item() + s_sub["repulsion"].item() * k / B)
    # the running statistics moved once (the whole batch), not twice
    for name, value in ens.state_dict().items():
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(value, after_full_pass[name])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ens.parameters())
