"""The vectorised ensemble (`model.execution=vmap`) against the per-member loop: same losses, same
gradients for every parameter, same batch-norm running statistics, same training run."""

import copy

import pytest
import torch

from conftest import devices
from forde.config import MethodConfig, ModelConfig
from forde.ensemble import build_ensemble
from forde.kernels import projection
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE
from forde.methods.lit import LIT
from forde.methods.rde_function import FunctionRDE
from forde.methods.rde_weight import WeightRDE
from forde.train import train
from test_train import final_weights, tiny

M, B, C = 3, 6, 5
SHAPE = (3, 8, 8)
D = 3 * 8 * 8
NO_FALLBACK = "error:.*batching rule"  # functorch's per-sample loop where an op has no batched kernel


def twins(name: str, shape=SHAPE):
    """The same ensemble twice, in float64 so the comparison is tight: loop and vmap execution."""
    cfg = ModelConfig(name=name, width=4, hidden=[16])
    loop = build_ensemble(cfg, M, shape, C, seed=0).double().train()
    fast = copy.deepcopy(loop)
    fast.execution = "vmap"
    return loop, fast


def methods():
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    proj = projection(q, torch.linspace(0.1, 2.0, D, dtype=torch.float64), 0.5)
    return {
        "de": DeepEnsemble(),
        "forde": FoRDE(MethodConfig(alpha=0.5), proj),
        "forde_log_prob": FoRDE(MethodConfig(alpha=0.0, grad_target="log_prob"), None),
        "forde_subset": FoRDE(MethodConfig(alpha=0.5, repulsion_subset=0.5), proj),
        "rde_function": FunctionRDE(MethodConfig(name="rde_function")),
        "rde_weight": WeightRDE(MethodConfig(name="rde_weight")),
        "lit": LIT(MethodConfig(name="lit", lit_weight=0.3)),
    }


def step(ens, method, x, y):
    ens.zero_grad()
    loss, outputs, _ = method.loss(ens, x, y)
    loss.backward()
    return loss.detach(), outputs.detach(), [p.grad.clone() for p in ens.parameters()]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("model", ["resnet18", "mlp"])
@pytest.mark.parametrize("method", list(methods()))
def test_vmap_matches_the_loop_in_loss_gradients_and_running_stats(model, method, device):
    loop, fast = (e.to(device) for e in twins(model))
    meth = methods()[method]
    if getattr(meth, "projection", None) is not None:
        meth.projection = meth.projection.to(device)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):  # the second step sees running statistics the first one updated
        x, y = torch.randn(B, *SHAPE, dtype=torch.float64, generator=g), torch.randint(0, C, (B,), generator=g)
        x, y = (x if model == "resnet18" else x.flatten(1)).to(device), y.to(device)
        ref, got = step(loop, meth, x, y), step(fast, meth, x, y)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
        for a, b in zip(got[2], ref[2]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for a, b in zip(fast.buffers(), loop.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    running = [b for n, b in loop.named_buffers() if n.endswith("running_mean")]
    assert model == "mlp" or running and all(r.abs().sum() > 0 for r in running)


@pytest.mark.parametrize("model", ["resnet18", "preact_resnet18", "wrn16_4"])
def test_vmap_matches_the_loop_in_evaluation_mode(model):
    loop, fast = twins(model)
    x = torch.randn(B, *SHAPE, dtype=torch.float64)
    for ens in (loop, fast):
        ens(x)  # one training batch moves the running statistics away from their initial values
        ens.eval()
    torch.testing.assert_close(fast(x), loop(x), rtol=1e-10, atol=1e-12)
    y = torch.zeros(B, dtype=torch.long)
    torch.testing.assert_close(fast.input_gradients(x, y)[1], loop.input_gradients(x, y)[1], rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings(NO_FALLBACK)
@pytest.mark.parametrize("model", ["resnet18", "preact_resnet18", "wrn16_4"])
def test_every_op_of_a_forde_step_has_a_batched_kernel(model):
    """functorch falls back to a per-member loop, with a warning, for an op without a batching rule."""
    ens = build_ensemble(ModelConfig(name=model, width=4), M, (3, 16, 16), C, seed=0).train()
    ens = ens.to(memory_format=torch.channels_last)  # as on a GPU; the contiguous layout is covered above
    ens.execution = "vmap"
    x = torch.randn(B, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    logits, grads = ens.input_gradients(x, torch.randint(0, C, (B,)))
    (logits.logsumexp(-1).sum() + grads.square().sum()).backward()


def test_a_vmap_training_run_ends_where_the_loop_run_ends(tmp_path):
    loop = train(tiny(tmp_path, "optim.epochs=1", name="loop"))
    fast = train(tiny(tmp_path, "optim.epochs=1", "model.execution=vmap", name="vmap"))
    assert fast["test"]["accuracy"] == pytest.approx(loop["test"]["accuracy"], abs=1e-3)
    assert fast["test"]["nll"] == pytest.approx(loop["test"]["nll"], rel=1e-3)
    a, b = final_weights(tmp_path / "loop"), final_weights(tmp_path / "vmap")
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-3, atol=1e-4)
