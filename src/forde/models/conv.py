"""2-D convolution whose second derivative calls the backend's own convolution kernels.

FoRDE differentiates each convolution's input gradient gx = conv_transpose(gy, W) once more. PyTorch's
generic double backward computes the weight term of that derivative as a convolution over batch-transposed
copies of the tensors, slower per FLOP than the weight-gradient kernel (benchmarks/README.md). Here that
derivative is written out: for q the incoming gradient of gx, d<q, gx>/dgy = conv(q, W) and d<q, gx>/dW is
the weight gradient of a convolution with input q and output gradient gy, each one native call.

The input-gradient pass asks only for gx: the convolution's own backward skips the weight gradient when the
autograd engine will not use it (PyTorch's `ConvolutionBackward0` does the same). `conv2d` takes F.conv2d's
arguments; `forde.models.derivatives` routes the F.conv2d calls of any network (every torch.nn.Conv2d layer) to it
during a pass that will be differentiated twice. Values are PyTorch's up to rounding (tests/test_conv.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from forde.torch_internals import weight_grad_used


def _backward(gy, x, w, conv, mask):
    """PyTorch's convolution backward: (gx, gw) where `mask` asks for them."""
    stride, padding, dilation, groups = conv
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gy, x, w, None, stride, padding, dilation, False, [0, 0], groups, [mask[0], mask[1], False]
    )
    return gx, gw


def _cast_for_autocast(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dtype autocast would run the convolution in (inside an autograd Function, autocast does not cast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return x.to(dtype), w.to(dtype)
    return x, w


class _ConvInputGrad(torch.autograd.Function):
    """gx = conv_transpose(gy, W) as a function of (gy, W), with its derivative by hand."""

    @staticmethod
    def forward(ctx, gy, x, w, conv):
        ctx.save_for_backward(gy, w)
        ctx.conv = conv
        return _backward(gy, x, w, conv, (True, False))[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, q):
        gy, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        d_gy = d_w = None
        if ctx.needs_input_grad[0]:
            d_gy = torch.ops.aten.convolution(q, w, None, stride, padding, dilation, False, [0, 0], groups)
        if ctx.needs_input_grad[2]:
            d_w = _backward(gy, q, w, ctx.conv, (False, True))[1]
        return d_gy, None, d_w, None


class _ConvTrain(torch.autograd.Function):
    """y = conv(x, W); the input gradient goes through `_ConvInputGrad` when it is differentiated again."""

    @staticmethod
    def forward(ctx, x, w, conv):
        x, w_run = _cast_for_autocast(x, w)
        ctx.save_for_backward(x, w)
        ctx.conv = conv
        stride, padding, dilation, groups = conv
        return torch.ops.aten.convolution(x, w_run, None, stride, padding, dilation, False, [0, 0], groups)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], weight_grad_used(fallback=ctx.needs_input_grad[1])
        w = w.to(gy.dtype)  # the dtype of the forward's arithmetic; differentiable, so gradients reach the weight
        if torch.is_grad_enabled():  # create_graph: this backward will be differentiated
            gx = _ConvInputGrad.apply(gy, x, w, ctx.conv) if need_x else None
            gw = _backward(gy, x, w, ctx.conv, (False, True))[1] if need_w else None  # PyTorch differentiates this
            return gx, gw, None
        gx, gw = _backward(gy, x, w, ctx.conv, (need_x, need_w))
        return gx, gw, None


def numeric_padding(padding, weight: torch.Tensor, dilation) -> list[int] | None:
    """A padding as two numbers: 'valid' is none; 'same' is half the dilated kernel on each side where that is
    symmetric (odd kernels); None for the asymmetric 'same' of even kernels, which F.conv2d pads unevenly."""
    if not isinstance(padding, str):
        return list(_pair(padding))
    if padding == "valid":
        return [0, 0]
    spans = [d * (k - 1) for d, k in zip(_pair(dilation), weight.shape[2:])]
    return [span // 2 for span in spans] if all(span % 2 == 0 for span in spans) else None


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d, through `_ConvTrain` for batched inputs (nn.Conv2d pads the non-zero padding modes itself before
    calling F.conv2d; 'valid' and symmetric 'same' are turned into numbers); the bias is added afterwards.
    Anything else (unbatched inputs, 'same' with an even kernel) is F.conv2d itself."""
    pad = numeric_padding(padding, weight, dilation)
    if pad is None or input.dim() != 4:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    conv = (list(_pair(stride)), pad, list(_pair(dilation)), groups)
    out = _ConvTrain.apply(input, weight.view_as(weight), conv)
    return out if bias is None else out + bias.to(out.dtype).view(1, -1, 1, 1)
