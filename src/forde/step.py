"""A training step's forward and backward, run eagerly or replayed from a CUDA graph.

The optimizer step stays outside (eager): the learning rate changes every step, and SGD over the members'
parameters is a handful of fused foreach kernels. Graphs pay where a step is many small kernel launches
(M members, each a ResNet forward, an input-gradient backward and a backward through both): captured once,
the whole launch sequence is replayed with one call. Shapes are static (the last incomplete batch is dropped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from forde.ensemble import Ensemble
from forde.methods import Method
from forde.methods.base import LossOutput

StepResult = LossOutput  # detached: loss, member outputs, statistics
GRAPH_WARMUP_STEPS = 3  # eager steps of each kind before its capture: cuDNN autotuning, library handles, buffers


class EagerStep:
    """loss, backward: parameters' .grad hold this step's gradients afterwards."""

    def __init__(self, method: Method, ensemble: Ensemble, autocast: Callable[[], contextlib.AbstractContextManager]):
        self.method, self.ensemble, self.autocast = method, ensemble, autocast

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, epoch: float = 0.0) -> StepResult:
        with self.autocast():
            out = self.method.loss(self.ensemble, x, y, step=step, epoch=epoch)
        self.ensemble.zero_grad(set_to_none=True)
        out.loss.backward()
        return LossOutput(out.loss.detach(), out.outputs.detach(), {k: v.detach() for k, v in out.stats.items()})


class _Graph:
    """One captured step: static inputs, the outputs it writes and the gradient tensors it writes into."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.graph = torch.cuda.CUDAGraph()
        self.x, self.y = x.clone(), y.clone()
        self.result: StepResult | None = None
        self.grads: list[torch.Tensor | None] = []


class GraphedStep:
    """The same computation as `EagerStep`, each kind of step captured as a CUDA graph after a few eager steps.

    A method whose steps differ (FoRDE with `repulsion_every` > 1) tells them apart with `step_kind(step)`;
    each kind gets its own graph, and the parameters' .grad are pointed at the gradients of the graph last run.
    The returned tensors belong to the graph: read them before the next step.
    """

    def __init__(self, method: Method, ensemble: Ensemble, autocast: Callable[..., contextlib.AbstractContextManager]):
        self.method, self.ensemble = method, ensemble
        self._eager = EagerStep(method, ensemble, lambda: autocast(cache_enabled=False))  # no cast cache in graphs
        self.params = list(ensemble.parameters())
        self.graphs: dict[object, _Graph] = {}
        self.eager_steps: dict[object, int] = {}
        self.side = torch.cuda.Stream()
        self.grads_of: _Graph | None = None  # the graph whose gradient tensors the parameters' .grad are

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, epoch: float = 0.0) -> StepResult:
        """`epoch` is not passed on: a replayed graph repeats its captured computation (config validation keeps
        epoch-dependent methods, the repulsion ramp, off graphs)."""
        kind = self.method.step_kind(step) if hasattr(self.method, "step_kind") else None
        graph = self.graphs.get(kind)
        if graph is None:
            seen = self.eager_steps.get(kind, 0)
            self.eager_steps[kind] = seen + 1
            if seen < GRAPH_WARMUP_STEPS:
                return self._on_side_stream(lambda: self._eager(x, y, step))
            graph = self.graphs[kind] = self._capture(x, y, step)
        else:
            graph.x.copy_(x)
            graph.y.copy_(y)
        graph.graph.replay()
        if self.grads_of is not graph:
            for p, g in zip(self.params, graph.grads):
                p.grad = g
            self.grads_of = graph
        assert graph.result is not None  # set when the graph was captured
        return graph.result

    def _on_side_stream(self, fn):
        """Warm-up as PyTorch's CUDA graph notes prescribe: on a side stream, ordered against the current one."""
        current = torch.cuda.current_stream()
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            out = fn()
        current.wait_stream(self.side)
        return out

    def _capture(self, x, y, step) -> _Graph:
        graph = _Graph(x, y)
        self.ensemble.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's memory pool
        with torch.cuda.graph(graph.graph):
            graph.result = self._eager(graph.x, graph.y, step)
        graph.grads = [p.grad for p in self.params]
        self.grads_of = graph
        return graph


def make_step(method: Method, ensemble: Ensemble, autocast, graphs: bool) -> EagerStep | GraphedStep:
    return GraphedStep(method, ensemble, autocast) if graphs else EagerStep(method, ensemble, autocast)
