"""FoRDE's options: the cheaper approximations (repulsion every k-th step, the kernel on a subset of the
batch) and the release's first-commit repulsion ramp."""

import copy
import json

import pytest
import torch

from forde.config import ConfigError, MethodConfig, ModelConfig, load_config
from forde.ensemble import build_ensemble
from forde.kernels import projection
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE, repulsion_weight
from forde.run_dir import run_dir_of
from forde.train import train

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


def test_repulsion_ramp_is_the_first_commits_schedule():
    """100 -> 1 linearly over 80 epochs, one value per epoch, then 1."""
    assert repulsion_weight(0.0, 100.0, 80) == 100.0
    assert repulsion_weight(0.99, 100.0, 80) == 100.0
    assert repulsion_weight(40.5, 100.0, 80) == pytest.approx(100 - 40 * 99 / 80)
    assert repulsion_weight(79.0, 100.0, 80) == pytest.approx(100 - 79 * 99 / 80)
    assert repulsion_weight(80.0, 100.0, 80) == 1.0 and repulsion_weight(250.0, 100.0, 80) == 1.0
    assert repulsion_weight(3.0, 1.0, 0) == 1.0


def test_ramp_multiplies_the_repulsion_and_its_gradient(problem):
    ens, x, y, proj = problem
    plain = FoRDE(MethodConfig(alpha=0.5), proj)
    ramped = FoRDE(MethodConfig(alpha=0.5, repulsion_ramp_start=100.0, repulsion_ramp_epochs=80), proj)
    de_loss, _, _ = DeepEnsemble().loss(ens, x, y)
    loss, _, stats = plain.loss(ens, x, y)
    loss_r, _, stats_r = ramped.loss(ens, x, y, epoch=20.3)
    w = 100 - 20 * 99 / 80
    assert stats_r["repulsion_weight"].item() == pytest.approx(w) and "repulsion_weight" not in stats
    assert (loss_r - de_loss).item() == pytest.approx(w * (loss - de_loss).item(), rel=1e-10)

    def grad(loss_value):
        grads = torch.autograd.grad(loss_value, list(ens.parameters()), retain_graph=True)
        return torch.cat([g.flatten() for g in grads])

    torch.testing.assert_close(grad(loss_r - de_loss), w * grad(loss - de_loss))


def test_trainer_passes_the_epoch_to_the_ramp(tmp_path):
    cfg = load_config(
        "quickstart",
        [
            f"run.out_dir={tmp_path}",
            f"data.root={tmp_path / 'data'}",
            "optim.epochs=3",
            "model.hidden=[16]",
            "ensemble_size=2",
            "eval.corruptions=[none]",
            "eval.grad_samples=0",
            "run.progress=false",
            "method.repulsion_ramp_start=10",
            "method.repulsion_ramp_epochs=2",
            "run.wandb.mode=disabled",
        ],
    )
    train(cfg)
    history = [json.loads(line) for line in (run_dir_of(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert [h["train/repulsion_weight"] for h in history] == pytest.approx([10.0, 5.5, 1.0])


def test_ramp_is_a_forde_option():
    with pytest.raises(ConfigError, match="the repulsion ramp is a FoRDE option"):
        load_config(
            "quickstart", ["method.name=lit", "method.repulsion_ramp_start=100", "method.repulsion_ramp_epochs=80"]
        )
