"""Batch norm's hand-written second derivative against PyTorch's own and against finite differences."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from conftest import devices
from forde.config import MethodConfig, ModelConfig
from forde.ensemble import build_ensemble
from forde.kernels import projection
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE
from forde.models.batchnorm import _BatchNormTrain
from forde.models.derivatives import hand_written_derivatives, native_derivatives

LAYERS = {
    "BatchNorm2d": (nn.BatchNorm2d, (6, 3, 5, 4)),
    "BatchNorm1d": (nn.BatchNorm1d, (7, 3)),
    "BatchNorm1d, sequences": (nn.BatchNorm1d, (5, 3, 4)),
    "BatchNorm3d": (nn.BatchNorm3d, (4, 3, 2, 3, 2)),
}


def second_order_grads(layer: nn.Module, x: torch.Tensor, terms: str) -> list[torch.Tensor]:
    """Gradients w.r.t. (x, weight, bias) of a loss built from the layer's output and its first derivatives."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype).to(y.device)
    out = (torch.tanh(y) * r).sum()
    gx, gw, gb = torch.autograd.grad(out, (x, layer.weight, layer.bias), create_graph=True)
    loss = out
    if "x" in terms:
        loss = loss + 0.3 * (gx**2).sum() + gx.sin().sum()
    if "w" in terms:
        loss = loss + (gw**3).sum()
    if "b" in terms:
        loss = loss + (gb * gw.detach()).sum() + gb.cos().sum()
    return list(torch.autograd.grad(loss, (x, layer.weight, layer.bias)))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("terms", ["x", "w", "b", "xwb"])
@pytest.mark.parametrize("momentum", [0.1, None, "untracked"])
def test_matches_pytorch_second_derivative(kind, terms, momentum):
    """Every torch.nn.BatchNorm*d, both running-average rules, and running statistics switched off as FoRDE's
    subset pass does."""
    torch.manual_seed(0)
    cls, shape = LAYERS[kind]
    untracked = momentum == "untracked"
    momentum = 0.1 if untracked else momentum
    fast = cls(3, momentum=momentum).double()
    with torch.no_grad():
        fast.weight.normal_()
        fast.bias.normal_()
    native = cls(3, momentum=momentum).double()
    native.load_state_dict(fast.state_dict())
    fast.track_running_stats = native.track_running_stats = not untracked
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    for _ in range(2):  # two steps: running statistics and the step counter move alike
        with hand_written_derivatives():
            got = second_order_grads(fast, x, terms)
        with native_derivatives():
            want = second_order_grads(native, x, terms)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    with hand_written_derivatives():
        assert type(cls(3).double()(x).grad_fn).__name__ == "_BatchNormTrainBackward"  # the path compared above
    for name, buffer in native.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[name], buffer, rtol=0, atol=0)
    assert fast.num_batches_tracked.item() == (0 if untracked else 2)


@pytest.mark.parametrize("kind", ["BatchNorm2d", "BatchNorm1d"])
def test_batch_norm_without_affine_part_takes_the_hand_written_path(kind):
    """affine=False: normalisation only; the same gradients as PyTorch's, through the hand-written path."""
    cls, shape = LAYERS[kind]
    fast, native = cls(3, affine=False).double(), cls(3, affine=False).double()
    x0 = torch.randn(shape, dtype=torch.float64) * 2 + 1
    grads = []
    for layer, path in ((fast, hand_written_derivatives), (native, native_derivatives)):
        x = x0.clone().requires_grad_(True)
        with path():
            y = layer(x)
            (gx,) = torch.autograd.grad((torch.tanh(y) * y).sum(), x, create_graph=True)
            grads.append(torch.autograd.grad((gx**2).sum() + gx.sin().sum(), x)[0])
            assert (type(y.grad_fn).__name__ == "_BatchNormTrainBackward") == (path is hand_written_derivatives)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.running_mean, native.running_mean, rtol=0, atol=0)


def test_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def bn(x, w, b):
        return _BatchNormTrain.apply(x, w, b, None, None, 0.1, 1e-5)

    assert torch.autograd.gradcheck(bn, (x, w, b))
    assert torch.autograd.gradgradcheck(bn, (x, w, b))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_matches_pytorch(device, channels_last, ieee_float32):
    torch.manual_seed(0)
    fast, native = nn.BatchNorm2d(8).to(device), nn.BatchNorm2d(8).to(device)
    x = torch.randn(16, 8, 6, 6, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with hand_written_derivatives():
        got = second_order_grads(fast, x, "xwb")
    with native_derivatives():
        want = second_order_grads(native, x, "xwb")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    for name, buffer in native.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[name], buffer)


def test_eval_mode_and_no_grad_use_running_statistics():
    layer = nn.BatchNorm2d(3)
    layer.running_mean.fill_(0.5)
    x = torch.randn(4, 3, 2, 2)
    layer.eval()
    torch.testing.assert_close(
        layer(x), nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False)
    )
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.num_batches_tracked.item() == 1


@pytest.mark.parametrize("model", [ModelConfig(name="resnet18", width=4), ModelConfig(name="mlp", hidden=[16, 16])])
@pytest.mark.parametrize("subset", [1.0, 0.5])
def test_forde_step_matches_pytorch_derivatives(model, subset):
    """A whole FoRDE loss and every parameter gradient, fast batch norm vs PyTorch's, in float64."""
    torch.manual_seed(0)
    shape = (3, 8, 8) if model.name == "resnet18" else (12,)
    x, y = torch.randn(10, *shape, dtype=torch.float64), torch.randint(0, 5, (10,))
    d = x[0].numel()
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    method = FoRDE(
        MethodConfig(name="forde", alpha=0.5, repulsion_subset=subset),
        projection(q, torch.rand(d, dtype=torch.float64) + 0.5, 0.5),
    )
    results = []
    for native in (False, True):
        ens = build_ensemble(model, 3, shape, 5, seed=0).double().train()
        with native_derivatives() if native else contextlib.nullcontext():
            loss, _, _ = method.loss(ens, x, y, step=0)
            loss.backward()
        results.append((loss.detach(), [p.grad for p in ens.parameters()]))
    (loss_fast, grads_fast), (loss_native, grads_native) = results
    torch.testing.assert_close(loss_fast, loss_native, rtol=1e-12, atol=0)
    for g, w in zip(grads_fast, grads_native):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_autocast_stays_close_to_float32(device, channels_last):
    """Under bf16 autocast (inputs bf16, statistics and weights float32) both paths keep float32's answer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1).to(device)
    x0, r = torch.randn(16, 3, 8, 8, device=device), torch.randn(16, 8, 8, 8, device=device)
    if channels_last:
        conv, x0 = conv.to(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)

    def grads(native: bool, bf16: bool) -> list[torch.Tensor]:
        layer, x = nn.BatchNorm2d(8).to(device), x0.clone().requires_grad_(True)
        with (
            torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext(),
            native_derivatives() if native else hand_written_derivatives(),
        ):
            y = layer(conv(x))
            assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)
            (gx,) = torch.autograd.grad((y.float().tanh() * r).sum(), x, create_graph=True)
            return list(torch.autograd.grad((gx**2).sum(), (x, layer.weight, conv.weight)))

    reference = grads(native=True, bf16=False)
    for native in (False, True):
        for g, want in zip(grads(native, bf16=True), reference):
            assert (g - want).abs().max() <= 0.05 * want.abs().max()


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_only_a_pass_differentiated_twice_takes_the_hand_written_path():
    """A DE step never differentiates twice: PyTorch's batch norm and convolution are faster there. FoRDE's
    input-gradient pass records the hand-written derivatives."""
    ens = build_ensemble(ModelConfig(name="resnet18", width=4), 2, (3, 8, 8), 5, seed=0).train()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    de_nodes = _graph_nodes(DeepEnsemble().loss(ens, x, y)[0])
    assert {"NativeBatchNormBackward0", "ConvolutionBackward0"} <= de_nodes
    assert not {"_BatchNormTrainBackward", "_ConvTrainBackward"} & de_nodes
    forde_nodes = _graph_nodes(FoRDE(MethodConfig(alpha=0.0), None).loss(ens, x, y)[0])
    assert {"_BatchNormTrainBackward", "_ConvTrainBackward"} <= forde_nodes
    assert not {"NativeBatchNormBackward0", "ConvolutionBackward0"} & forde_nodes
    with native_derivatives():  # an explicit choice wins
        assert "_BatchNormTrainBackward" not in _graph_nodes(FoRDE(MethodConfig(alpha=0.0), None).loss(ens, x, y)[0])
