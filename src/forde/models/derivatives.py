"""Which derivatives a network records: PyTorch's own, or the hand-written second derivatives of batch norm
(`forde.models.batchnorm`) and convolution (`forde.models.conv`), for any network.

The hand-written path pays only where a second derivative is taken: a plain training step (DE, the repulsive
ensembles in weight or function space) is faster with PyTorch's (benchmarks/README.md). So networks take PyTorch's
path unless a pass that will be differentiated twice asks for the other one (`Ensemble.output_gradients` does,
through `for_double_backward()`). There a TorchFunctionMode routes every F.batch_norm and F.conv2d call, i.e. every
torch.nn.BatchNorm*d and torch.nn.Conv2d layer of whatever network, to the hand-written versions; outside it nothing
is intercepted, so plain steps pay nothing. `native_derivatives()` and `hand_written_derivatives()` force either
path, e.g. PyTorch's under torch.func.vmap, which does not run custom autograd Functions.

The same pass selects PyTorch's math kernel for scaled dot-product attention: the fused kernels (flash attention on
the CPU, flash and memory-efficient attention on CUDA) have no second derivative.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from forde.models.batchnorm import batch_norm
from forde.models.conv import conv2d

# None: not chosen, PyTorch's path
_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar("layer_derivatives", default=None)
_ROUTING = contextvars.ContextVar("routing_layers", default=False)  # whether a _HandWrittenLayers mode is active
_ROUTES: dict[Callable, Callable] = {F.batch_norm: batch_norm, F.conv2d: conv2d}


class _HandWrittenLayers(TorchFunctionMode):
    """F.batch_norm and F.conv2d through the hand-written second derivatives while that path is chosen and
    gradients are recorded; every other call, and these under `native_derivatives()`, as they are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        route = _ROUTES.get(func)
        if route is not None and _PATH.get() == "hand_written" and torch.is_grad_enabled():
            return route(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _use(path: str, force: bool = True):
    if not force and _PATH.get() is not None:  # an outer block chose already
        yield
        return
    token = _PATH.set(path)
    routing = path == "hand_written" and not _ROUTING.get()
    routing_token = _ROUTING.set(True) if routing else None
    try:
        with _HandWrittenLayers() if routing else contextlib.nullcontext():
            yield
    finally:
        if routing_token is not None:
            _ROUTING.reset(routing_token)
        _PATH.reset(token)


def native_derivatives():
    """Within this block, networks record PyTorch's own derivatives."""
    return _use("native")


def hand_written_derivatives():
    """Within this block, training-mode batch norm and 2-D convolutions record the hand-written second derivatives."""
    return _use("hand_written")


@contextlib.contextmanager
def for_double_backward():
    """For a pass that will be differentiated twice: the hand-written derivatives unless an outer block chose a
    path, and scaled dot-product attention by its math kernel, the one with a second derivative."""
    with sdpa_kernel(SDPBackend.MATH), _use("hand_written", force=False):
        yield
