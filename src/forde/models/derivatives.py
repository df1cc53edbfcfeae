"""Which derivatives the network layers record: PyTorch's own, or the hand-written second derivatives of batch
norm (`forde.models.batchnorm`) and convolution (`forde.models.conv`).

The hand-written path pays only where a second derivative is taken: a plain training step (DE, the repulsive
ensembles in weight or function space) is faster with PyTorch's layers (benchmarks/README.md). So the layers take
PyTorch's path unless a pass that will be differentiated twice asks for the other one (`Ensemble.output_gradients`
does, through `for_double_backward()`); `native_derivatives()` and `hand_written_derivatives()` force either path,
e.g. PyTorch's under torch.func.vmap, which does not run custom autograd Functions.
"""

from __future__ import annotations

import contextlib
import contextvars

_PATH = contextvars.ContextVar("layer_derivatives", default=None)  # None: not chosen, PyTorch's path


@contextlib.contextmanager
def _use(path: str, force: bool = True):
    if not force and _PATH.get() is not None:  # an outer block chose already
        yield
        return
    token = _PATH.set(path)
    try:
        yield
    finally:
        _PATH.reset(token)


def native_derivatives():
    """Within this block, the layers built here record PyTorch's own derivatives."""
    return _use("native")


def hand_written_derivatives():
    """Within this block, training-mode batch norm and convolutions record the hand-written second derivatives."""
    return _use("hand_written")


def for_double_backward():
    """The hand-written path for a pass that will be differentiated twice, unless an outer block chose a path."""
    return _use("hand_written", force=False)


def hand_written() -> bool:
    return _PATH.get() == "hand_written"
