"""Batch norm with a cheaper exact second derivative.

FoRDE differentiates the input-gradient pass again, so every training-mode batch norm is differentiated
twice. PyTorch derives that second derivative as a generic composition of many elementwise operations
(benchmarks/step_profile.py shows its share of a step). Here the first backward is PyTorch's own kernel,
wrapped so that its derivative can be written by hand: with q the incoming gradient of gx, the derivative
w.r.t. the output gradient g is batch norm's backward applied to q (one native call, which also yields
sum(q) and sum(q * xhat)), and the derivative w.r.t. x collapses to three terms in xhat, that result and gx.
The values are the same as PyTorch's up to rounding (tests/test_batchnorm.py compares both in float64).

`batch_norm` takes F.batch_norm's arguments; `forde.models.derivatives` routes the F.batch_norm calls of any
network (every torch.nn.BatchNorm*d layer) to it during a pass that will be differentiated twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _backward(gy, x, weight, mean, invstd, eps):
    """PyTorch's training-mode batch norm backward: (gx, sum(gy * xhat), sum(gy)), sums per channel."""
    return torch.ops.aten.native_batch_norm_backward(
        gy, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
    )


class _BatchNormBackward(torch.autograd.Function):
    """gx, gw, gb of training-mode batch norm as a function of (gy, x, weight), with its derivative by hand."""

    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps):
        gx, gw, gb = _backward(gy, x, weight, mean, invstd, eps)
        ctx.save_for_backward(gy, x, weight, mean, invstd, gx, gw, gb)
        ctx.eps = eps
        ctx.set_materialize_grads(
            False
        )  # an output nothing used (gw, gb of the input-gradient pass) gets None, not zeros
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        g, x, weight, mean, invstd, gx, s_gx, s_g = ctx.saved_tensors

        def per_channel(t):
            return t.view([1, -1] + [1] * (x.dim() - 2))

        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        gg = gx_out = gw_out = None
        if ggx is not None:
            # gx = w invstd (g - mean(g) - xhat mean(g xhat)) is linear in g: its adjoint is the same map on ggx
            gg, s_qx, s_q = _backward(ggx, x, weight, mean, invstd, ctx.eps)
            k = torch.sum(ggx * g, dims, dtype=invstd.dtype) - (s_q * s_g + s_qx * s_gx) / n
            gw_out = invstd * k
            # d<ggx, gx>/dx = -(invstd / n) (w invstd k xhat + s_gx gg + s_qx gx), with xhat = (x - mean) invstd
            a = -weight * k * invstd**3 / n
            gx_out = torch.addcmul(per_channel(-a * mean), x, per_channel(a))
            gx_out.addcmul_(gg, per_channel(-invstd * s_gx / n)).addcmul_(gx, per_channel(-invstd * s_qx / n))
        if ggw is not None:  # gw = sum(g xhat): d/dg = xhat, d/dx = batch norm's backward of g with unit weight
            c = ggw * invstd
            gg_w = torch.addcmul(per_channel(-c * mean), x, per_channel(c))
            gg = gg_w if gg is None else gg + gg_w
            gx_w = _backward(g, x, None, mean, invstd, ctx.eps)[0] * per_channel(ggw)
            gx_out = gx_w if gx_out is None else gx_out + gx_w
        if ggb is not None:  # gb = sum(g)
            gg = per_channel(ggb).expand_as(g).clone() if gg is None else gg + per_channel(ggb)
        return gg, gx_out, gw_out, None, None, None


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm (running statistics updated in place) whose backward is `_BatchNormBackward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, gw, gb, None, None, None, None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """F.batch_norm, through `_BatchNormTrain` where it normalises with batch statistics (nn.BatchNorm*d in
    training mode, or without running statistics; without an affine part (`affine=False`) as with weight 1 and
    bias 0, constants); in evaluation mode it is F.batch_norm itself, a fixed per-channel affine map whose second
    derivative PyTorch's own autograd takes as cheaply. Running statistics, when given, are updated in place with
    `momentum` as F.batch_norm updates them."""
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    channels = input.shape[1]
    reduced = input.dtype in (torch.float16, torch.bfloat16)  # autocast: parameters stay float32
    dtype = running_mean.dtype if running_mean is not None else torch.float32 if reduced else input.dtype
    if weight is None:
        weight = torch.ones(channels, dtype=dtype, device=input.device)
    if bias is None:
        bias = torch.zeros(channels, dtype=dtype, device=input.device)
    values = input.numel() // input.shape[1]
    if values == 1:  # as F.batch_norm refuses it: one value per channel has no variance
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    return _BatchNormTrain.apply(input, weight, bias, running_mean, running_var, momentum, eps)
