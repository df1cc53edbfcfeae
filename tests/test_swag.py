"""SWAG against plain computations: the moments against the collected vectors, a draw against the published
formula, the draws' covariance against the low-rank-plus-diagonal matrix it stands for, the refreshed batch-norm
statistics against the training data's own mean, the averaged prediction, and resume / `forde eval`."""

import math

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from forde.config import ConfigError, MethodConfig, ModelConfig, load_config
from forde.data.base import Split
from forde.ensemble import build_ensemble
from forde.evaluate import EvalContext, predict_logits
from forde.methods.swag import SWAG, MemberMoments, SWAGSampler, draw_seed
from forde.run_dir import CHECKPOINT
from forde.run_evaluation import evaluate_run
from forde.train import train
from test_train import Crash, strip, tiny

M, D_IN, C = 2, 3, 4


def ensemble(rank: int = 3, seed: int = 0):
    ens = build_ensemble(ModelConfig(name="mlp", hidden=[5]), M, (D_IN,), C, seed).double()
    method = SWAG(MethodConfig(name="swag", swag_rank=rank, swag_samples=3, swag_scale=0.5))
    method.attach(ens)
    return ens, method


def perturb(ens, step: int):
    with torch.no_grad():
        for p in ens.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step), dtype=p.dtype))


def test_moments_are_the_running_averages_and_the_last_deviations():
    ens, method = ensemble(rank=3)
    thetas = []
    for n in range(5):
        perturb(ens, n)
        method.end_epoch(ens, epoch=10, epochs=10)
        thetas.append([parameters_to_vector(m.parameters()).detach().numpy().copy() for m in ens.members])
    for i, moments in enumerate(ens.swag):
        th = np.stack([t[i] for t in thetas])
        np.testing.assert_allclose(moments.mean.numpy(), th.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(moments.sq_mean.numpy(), (th**2).mean(0), rtol=1e-12, atol=1e-12)
        # the deviation of collection n is theta_n minus the mean of the first n + 1; the last 3 are kept
        devs = {n: th[n] - th[: n + 1].mean(0) for n in range(5)}
        held = sorted(np.round(moments.deviations.numpy(), 9).tolist())
        assert held == sorted(np.round(np.stack([devs[2], devs[3], devs[4]]), 9).tolist())
        assert int(moments.collected) == 5


def test_collection_starts_after_the_share_of_epochs():
    method = SWAG(MethodConfig(name="swag", swag_start=0.537))
    assert [e for e in range(1, 301) if method.collects_after(e, 300)][:2] == [162, 163]
    assert method.collects_after(300, 300)


def test_a_draw_is_the_published_formula():
    ens, method = ensemble(rank=3)
    for n in range(4):
        perturb(ens, n)
        method.end_epoch(ens, 1, 1)
    moments = ens.swag[0]
    theta = moments.sample(0.5, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    mean, sq, d = (t.numpy() for t in (moments.mean, moments.sq_mean, moments.deviations))
    z1 = torch.randn(mean.shape, generator=g, dtype=torch.float64).numpy()
    z2 = torch.randn(3, generator=g, dtype=torch.float64).numpy()
    sigma = np.sqrt(np.maximum(sq - mean**2, 1e-30))
    expected = mean + math.sqrt(0.5) * (sigma * z1 + d.T @ z2 / math.sqrt(3 - 1))
    np.testing.assert_allclose(theta.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_the_draws_covariance_is_half_the_diagonal_plus_low_rank_matrix():
    """Monte Carlo: 40,000 draws of a 6-dimensional SWAG posterior against scale (diag(sigma^2) + D^T D / (K-1))."""
    moments = MemberMoments(torch.nn.Linear(2, 2, dtype=torch.float64), rank=3)  # 6 parameters
    g = torch.Generator().manual_seed(0)
    moments.mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    moments.sq_mean.copy_(moments.mean.square() + torch.rand(6, generator=g, dtype=torch.float64))
    moments.deviations.copy_(torch.randn(3, 6, generator=g, dtype=torch.float64))
    draws = torch.stack([moments.sample(0.5, g) for _ in range(40_000)]).numpy()
    sigma2 = (moments.sq_mean - moments.mean.square()).numpy()
    d = moments.deviations.numpy()
    expected = 0.5 * (np.diag(sigma2) + d.T @ d / 2)
    np.testing.assert_allclose(np.cov(draws.T), expected, atol=0.03)
    np.testing.assert_allclose(draws.mean(0), moments.mean.numpy(), atol=0.03)


def test_batch_norm_is_refreshed_on_the_training_data_for_each_draw():
    ens, method = ensemble(rank=2)
    for n in range(3):
        perturb(ens, n)
        method.end_epoch(ens, 1, 1)
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampler = SWAGSampler(ens, method.cfg, seed=5, refresh_batches=lambda draw: x.split(10), autocast=_nothing)
    trained = {k: v.clone() for k, v in ens.state_dict().items()}
    for draw in (0, 1, 0):
        with sampler.use(draw):
            for i, member in enumerate(ens.members):
                theta = ens.swag[i].sample(0.5, torch.Generator().manual_seed(draw_seed(5, draw, i)))
                torch.testing.assert_close(parameters_to_vector(member.parameters()), theta, rtol=0, atol=0)
                pre_bn = member.net[1](x)  # the Linear before the batch norm, with the draw's weights
                bn = member.net[2]
                torch.testing.assert_close(bn.running_mean, pre_bn.mean(0), rtol=1e-12, atol=1e-12)
                batch_vars = torch.stack([c.var(0, unbiased=True) for c in pre_bn.detach().split(10)])
                torch.testing.assert_close(bn.running_var, batch_vars.mean(0), rtol=1e-12, atol=1e-12)
    for k, v in ens.state_dict().items():  # the trained network comes back after each draw
        assert torch.equal(v, trained[k]), k


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_the_prediction_averages_the_draws_probabilities():
    ens, method = ensemble(rank=2)
    for n in range(3):
        perturb(ens, n)
        method.end_epoch(ens, 1, 1)
    ens = ens.float()
    x = torch.randn(12, D_IN, generator=torch.Generator().manual_seed(4))
    sampler = SWAGSampler(ens, method.cfg, seed=5, refresh_batches=lambda draw: [x], autocast=_nothing)
    ctx = EvalContext(torch.device("cpu"), (0.0,), (1.0,), 5, 0, sampler=sampler)
    got = predict_logits(ens, Split(x, torch.zeros(12, dtype=torch.int64)), ctx).double()
    probs = []
    for draw in range(3):
        with sampler.use(draw):
            ens.eval()
            with torch.no_grad():
                probs.append(torch.stack([m(x).float().double().softmax(-1) for m in ens.members]))
    torch.testing.assert_close(got.softmax(-1), torch.stack(probs).mean(0), rtol=1e-5, atol=1e-6)


def test_nothing_collected_is_one_line():
    ens, method = ensemble()
    with pytest.raises(ConfigError, match="method.swag_start"):
        SWAGSampler(ens, method.cfg, 0, lambda d: [], _nothing)
    with pytest.raises(ConfigError, match="method.swag_rank = 1"):
        load_config("quickstart", ["method.name=swag", "method.swag_rank=1"])
    with pytest.raises(ConfigError, match="method.swag_start = 1.0"):
        load_config("quickstart", ["method.name=swag", "method.swag_start=1.0"])


SWAG_RUN = ["method.name=swag", "method.swag_start=0.3", "method.swag_samples=2", "optim.epochs=4"]


def test_a_resumed_swag_run_equals_an_unstopped_one_and_forde_eval_repeats_it(tmp_path):
    straight = train(tiny(tmp_path, *SWAG_RUN, name="straight"))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, *SWAG_RUN, name="resumed"), callbacks=[Crash(at=3)])
    resumed = train(tiny(tmp_path, *SWAG_RUN, name="resumed"))
    assert strip(resumed) == strip(straight)
    assert straight["eval_samples"] == 2
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=False)["ensemble"]
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)["ensemble"]
    assert int(a["swag.0.collected"]) == 3 and all(torch.equal(a[k], b[k]) for k in a)
    again = evaluate_run(tmp_path / "straight", out_name="again.json")
    assert again["summary"] == straight["summary"]
