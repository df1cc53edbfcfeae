"""The convolution's hand-written second derivative against PyTorch's own and against finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import devices
from forde.models import conv as conv_module
from forde.models.conv import _ConvTrain
from forde.models.derivatives import hand_written_derivatives, native_derivatives

LAYERS = {
    "3x3": dict(kernel_size=3, stride=1, padding=1),
    "3x3 stride 2": dict(kernel_size=3, stride=2, padding=1),
    "1x1 stride 2": dict(kernel_size=1, stride=2, padding=0),
    "grouped": dict(kernel_size=3, padding=1, groups=2),
    "depthwise": dict(kernel_size=3, padding=1, groups=4),
    "bias": dict(kernel_size=3, padding=1, bias=True),
    "reflect padding, dilation 2": dict(kernel_size=3, padding=2, dilation=2, padding_mode="reflect", bias=True),
    "2x2 patches": dict(kernel_size=2, stride=2, bias=True),
    "padding='same'": dict(kernel_size=3, padding="same", bias=True),
    "padding='same', dilation 2, 5x3": dict(kernel_size=(5, 3), padding="same", dilation=2),
    "padding='valid'": dict(kernel_size=3, padding="valid", bias=True),
}


def second_order_grads(layer: nn.Conv2d, x: torch.Tensor, with_weight: bool) -> list[torch.Tensor]:
    """Gradients w.r.t. (x, weight, bias if any) of a loss built from the output and its input gradient (and
    parameter gradients)."""
    x = x.clone().requires_grad_(True)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    y = layer(x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y)
    out = (torch.tanh(y.float()) * r).sum()
    first = torch.autograd.grad(out, [x, *params] if with_weight else [x], create_graph=True)
    loss = out + 0.3 * (first[0] ** 2).sum() + first[0].float().sin().sum()
    if with_weight:
        loss = loss + sum((g**3).sum() for g in first[1:])
    return list(torch.autograd.grad(loss, [x, *params]))


def graph_nodes(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def twin_layers(name: str, device="cpu", dtype=torch.float64) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(0)
    options = {"bias": False, **LAYERS[name]}
    out = 4 if options.get("groups") == 4 else 6
    fast, native = (nn.Conv2d(4, out, **options).to(device, dtype) for _ in range(2))
    native.load_state_dict(fast.state_dict())
    return fast, native


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("with_weight", [False, True])
def test_matches_pytorch_second_derivative(name, with_weight):
    fast, native = twin_layers(name)
    x = torch.randn(5, 4, 9, 8, dtype=torch.float64)
    with hand_written_derivatives():
        got = second_order_grads(fast, x, with_weight)
        assert "_ConvTrainBackward" in graph_nodes(fast(x))  # the path compared is the hand-written one
    with native_derivatives():
        want = second_order_grads(native, x, with_weight)
        assert "_ConvTrainBackward" not in graph_nodes(native(x))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def conv(x, w):
        return _ConvTrain.apply(x, w.view_as(w), ([2, 2], [1, 1], [1, 1], 1))

    assert torch.autograd.gradcheck(conv, (x, w))
    assert torch.autograd.gradgradcheck(conv, (x, w))


def test_input_gradient_pass_skips_the_weight_gradient(monkeypatch):
    """autograd.grad w.r.t. the input never uses the weight gradient: it is not computed. backward() computes it."""
    asked = []
    native_backward = conv_module._backward
    monkeypatch.setattr(conv_module, "_backward", lambda *a: asked.append(a[-1]) or native_backward(*a))
    layer = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with hand_written_derivatives():
        y = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert asked == [(True, False)]
    asked.clear()
    gx.square().sum().backward()
    assert (False, True) in asked and layer.weight.grad is not None


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_matches_pytorch(device, channels_last, ieee_float32):
    fast, native = twin_layers("3x3 stride 2", device, torch.float32)
    x = torch.randn(8, 4, 12, 12, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fast, native = fast.to(memory_format=torch.channels_last), native.to(memory_format=torch.channels_last)
    with hand_written_derivatives():
        got = second_order_grads(fast, x, with_weight=False)
    with native_derivatives():
        want = second_order_grads(native, x, with_weight=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


@pytest.mark.parametrize("device", devices())
def test_bfloat16_autocast_runs_in_bfloat16_and_stays_close_to_float32(device):
    """Under autocast the convolutions run in bf16, as PyTorch's would, and the gradients reach the float32
    weights and inputs in their own dtype."""
    fast, native = twin_layers("3x3", device, torch.float32)
    x = torch.randn(8, 4, 12, 12, device=device)
    with native_derivatives():
        reference = second_order_grads(native, x, with_weight=False)
    with torch.autocast(device, dtype=torch.bfloat16), hand_written_derivatives():
        assert fast(x).dtype == torch.bfloat16
        got = second_order_grads(fast, x, with_weight=False)
    for g, want in zip(got, reference):
        assert g.dtype == torch.float32
        assert (g - want).abs().max() <= 0.05 * want.abs().max()


def test_same_padding_of_an_even_kernel_keeps_pytorch_s_path():
    """F.conv2d pads an even kernel's 'same' unevenly, which the numeric padding cannot say: PyTorch's own path."""
    layer = nn.Conv2d(4, 6, kernel_size=2, padding="same").double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with hand_written_derivatives():
        assert "_ConvTrainBackward" not in graph_nodes(layer(x))
