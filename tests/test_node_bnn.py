"""Node-BNN against independent computations: the entropy bound and the prior cross-entropy by numerical
integration (SciPy), the training loss by an explicit noisy forward pass, the evaluation draws against the
deterministic network at each component's multipliers, the optimizer groups, and resume / `forde eval`."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats
from torch import nn

from forde.config import ConfigError, MethodConfig, ModelConfig, load_config
from forde.data.base import Split
from forde.ensemble import Ensemble, build_ensemble
from forde.evaluate import EvalContext, predict_logits
from forde.methods.node_bnn import NodeBNN, NodeSampler, bhattacharyya_entropy, prior_cross_entropy
from forde.methods.swag import draw_seed
from forde.run_dir import CHECKPOINT
from forde.run_evaluation import evaluate_run
from forde.setup import build
from forde.train import Trainer, train
from test_train import Crash, strip, tiny

M, D_IN, C, B = 2, 3, 4, 6


def bhattacharyya_1d(m1, s1, m2, s2):
    """-log of the integral of sqrt(p q) for two 1-D Gaussians, by quadrature."""
    value, _ = integrate.quad(
        lambda z: math.sqrt(stats.norm.pdf(z, m1, s1) * stats.norm.pdf(z, m2, s2)), -30, 30, points=[m1, m2]
    )
    return -math.log(value)


def test_the_entropy_bound_by_quadrature():
    g = torch.Generator().manual_seed(0)
    mean = 1 + 0.5 * torch.randn(3, 2, generator=g, dtype=torch.float64)
    std = 0.2 + torch.rand(3, 2, generator=g, dtype=torch.float64)
    k = mean.shape[0]
    bd = np.array(
        [
            [sum(bhattacharyya_1d(mean[i, d], std[i, d], mean[j, d], std[j, d]) for d in range(2)) for j in range(k)]
            for i in range(k)
        ]
    )
    conditional = np.mean([sum(stats.norm(0, std[i, d]).entropy() for d in range(2)) for i in range(k)])
    expected = conditional - np.mean(np.log(np.exp(-bd).mean(1)))
    assert bhattacharyya_entropy(mean, std).item() == pytest.approx(expected, rel=1e-7)
    # ... and it bounds the mixture's entropy from below (Monte Carlo, 200k draws)
    comp = torch.randint(0, k, (200_000,), generator=g)
    z = mean[comp] + std[comp] * torch.randn(200_000, 2, generator=g, dtype=torch.float64)
    dens = torch.stack([torch.distributions.Normal(mean[i], std[i]).log_prob(z).sum(1) for i in range(k)])
    true_entropy = -(torch.logsumexp(dens, 0) - math.log(k)).mean().item()
    assert bhattacharyya_entropy(mean, std).item() <= true_entropy + 0.01


def test_the_prior_cross_entropy_by_quadrature():
    mean = torch.tensor([[0.8, 1.3], [1.1, 0.9]], dtype=torch.float64)
    std = torch.tensor([[0.3, 0.5], [0.2, 0.4]], dtype=torch.float64)
    expected = np.mean(
        [
            sum(
                integrate.quad(
                    lambda z, i=i, d=d: -stats.norm.pdf(z, mean[i, d], std[i, d]) * stats.norm.logpdf(z, 1, 0.4),
                    -20,
                    20,
                )[0]
                for d in range(2)
            )
            for i in range(2)
        ]
    )
    assert prior_cross_entropy(mean, std, 0.4).item() == pytest.approx(expected, rel=1e-8)


def problem(**method):
    ens = build_ensemble(ModelConfig(name="mlp", hidden=[5]), M, (D_IN,), C, 0).double().train()
    cfg = MethodConfig(name="node_bnn", node_components=3, node_train_samples=2, **method)
    node = NodeBNN(cfg, train_size=100, epochs=10, seed=7)
    node.attach(ens)
    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(2))
    return ens, node, x, y


def test_the_training_loss_is_the_noisy_forward_and_the_divergence():
    ens, node, x, y = problem(node_gamma=0.5, node_kl_ramp=0.5)
    loss, outputs, stats_ = node.loss(ens, x, y, step=3, epoch=2.5)
    xr, yr = x.repeat_interleave(2, 0), y.repeat_interleave(2, 0)
    comp = torch.arange(2 * B) % 3
    nll, cross, entropy = 0.0, 0.0, 0.0
    for i, (member, noise) in enumerate(zip(ens.members, ens.node_bnn)):
        g = torch.Generator().manual_seed(draw_seed(7, 3, 1, i))  # (run seed, step, training, member)
        lin1, bn, lin2 = member.net[1], member.net[2], member.net[4]
        (m1, m2), (s1, s2) = list(noise.means), [F.softplus(s) for s in noise.raw_stds]
        z1 = m1[comp] + s1[comp] * torch.randn(2 * B, 5, generator=g, dtype=torch.float64)
        h = torch.relu(F.batch_norm(F.linear(xr, lin1.weight, lin1.bias) * z1, None, None, bn.weight, bn.bias, True))
        z2 = m2[comp] + s2[comp] * torch.randn(2 * B, C, generator=g, dtype=torch.float64)
        logits = F.linear(h, lin2.weight, lin2.bias) * z2
        nll = nll + F.cross_entropy(logits, yr)
        for mean, std in ((m1, s1), (m2, s2)):
            cross = cross + prior_cross_entropy(mean, std, 0.4)
            entropy = entropy + bhattacharyya_entropy(mean, std)
    beta = 2 / (0.5 * 10)  # epoch 2 of a ramp over 5 epochs
    expected = nll + beta * (cross - 1.5 * entropy) / 100
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert stats_["kl_weight"].item() == pytest.approx(beta)
    assert outputs.shape == (M, B, C)
    grads = torch.autograd.grad(loss, list(ens.parameters()))
    expected_grads = torch.autograd.grad(expected, list(ens.parameters()))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_draw_uses_one_component_for_every_example():
    """With the components' spread near zero, draw s is the network with component s mod K's mean multipliers."""
    ens, node, x, _ = problem()
    ens = ens.float().eval()
    with torch.no_grad():
        for noise in ens.node_bnn:
            for s in noise.raw_stds:
                s.fill_(-30.0)  # softplus -> 1e-13
    sampler = NodeSampler(ens, seed=7, samples=6)
    x = x.float()
    ctx = EvalContext(torch.device("cpu"), (0.0,), (1.0,), 4, 0, sampler=sampler)
    got = predict_logits(ens, Split(x, torch.zeros(B, dtype=torch.int64)), ctx)
    probs = []
    for draw in range(6):
        component = draw % 3
        per_member = []
        for member, noise in zip(ens.members, ens.node_bnn):
            lin1, bn, lin2 = member.net[1], member.net[2], member.net[4]
            h = torch.relu(bn(F.linear(x, lin1.weight, lin1.bias) * noise.means[0][component]))
            per_member.append((F.linear(h, lin2.weight, lin2.bias) * noise.means[1][component]).softmax(-1))
        probs.append(torch.stack(per_member))
    torch.testing.assert_close(got.softmax(-1), torch.stack(probs).mean(0).detach(), rtol=1e-4, atol=1e-5)


def test_the_variational_parameters_keep_their_own_rate(tmp_path):
    cfg = tiny(tmp_path, "method.name=node_bnn", "method.node_lr=0.07")
    setup = build(cfg)
    trainer = Trainer(setup, tmp_path / "run")
    det, var = trainer.optimizer.param_groups
    assert var["fixed_lr"] and var["momentum"] == 0 and var["weight_decay"] == 0 and var["lr"] == 0.07
    assert {id(p) for p in var["params"]} == {id(p) for p in setup.ensemble.node_bnn.parameters()}
    assert len(det["params"]) + len(var["params"]) == len(list(setup.ensemble.parameters()))
    trainer.train_epoch()
    assert var["lr"] == 0.07 and det["lr"] != 0.07


def test_networks_without_units_and_vmap_are_one_line():
    node = NodeBNN(MethodConfig(name="node_bnn"), 10, 1, 0)
    with pytest.raises(ConfigError, match="has none"):
        node.attach(Ensemble([nn.Flatten(), nn.Flatten()]))
    with pytest.raises(ConfigError, match="model.execution"):
        load_config("quickstart", ["method.name=node_bnn", "model.execution=vmap"])


NODE_RUN = ["method.name=node_bnn", "method.node_test_samples=1", "optim.epochs=3"]


def test_a_resumed_node_bnn_run_equals_an_unstopped_one_and_forde_eval_repeats_it(tmp_path):
    straight = train(tiny(tmp_path, *NODE_RUN, name="straight"))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, *NODE_RUN, name="resumed"), callbacks=[Crash(at=2)])
    resumed = train(tiny(tmp_path, *NODE_RUN, name="resumed"))
    assert strip(resumed) == strip(straight)
    assert straight["eval_samples"] == 4
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=False)["ensemble"]
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["ensemble"]
    assert any(k.startswith("node_bnn.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    again = evaluate_run(tmp_path / "straight", out_name="again.json")
    assert again["summary"] == straight["summary"]
