"""M members trained together: logits [M, B, C] and per-member input gradients [M, B, D].

Two ways to run the members, same results: `loop` calls them one after another (the reference),
`vmap` runs them as one vectorised computation (torch.func: the members' parameters stacked, each
convolution becoming one grouped convolution). It is meant for GPUs, where a loop of small kernels
leaves the device idle between launches; on the CPU it is slower than the loop (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, vmap

from forde.config import ModelConfig
from forde.errors import ConfigError
from forde.models import build_model
from forde.models.derivatives import for_double_backward, native_derivatives
from forde.torch_internals import is_compiled

_ROWS: ContextVar[tuple[int, int] | None] = ContextVar("forde_batch_rows", default=None)


def batch_rows(rows: int) -> tuple[int, int]:
    """(first row, rows of the whole batch) for the `rows` rows a member is running now: (0, rows) on one process.
    A data-parallel process runs a share of each batch (forde.distributed); a method that draws randomness per
    example (node-BNN's noise) draws it for the whole batch and keeps these rows, as one process would."""
    return _ROWS.get() or (0, rows)


@contextlib.contextmanager
def running_rows(first: int, batch: int) -> Iterator[None]:
    """Within the block, the members run rows first.. of a `batch`-row batch (see `batch_rows`)."""
    token = _ROWS.set((first, batch))
    try:
        yield
    finally:
        _ROWS.reset(token)


class InputGradients(NamedTuple):
    """The members' outputs on a batch and their input gradients; a tuple, so `outputs, grads = ...` works too.

    Attributes:
        outputs: `[M, B, C]`, the members' outputs.
        grads: `[M, B, D]`, per member and sample the gradient of the differentiated output with respect to
            that sample's input, flattened (D = the number of input features, e.g. C * H * W).
    """

    outputs: torch.Tensor
    grads: torch.Tensor


class Ensemble(nn.Module):
    """M networks trained together, called on one batch as one module: `ensemble(x)` is `[M, B, C]`.

    Any `nn.Module` members that map a batch `[B, ...]` to outputs `[B, C]` will do; they need not share an
    architecture unless `execution="vmap"`. The members stay separate modules (`ensemble.members[i]`), so an
    optimizer over `ensemble.parameters()` updates each one and `state_dict()` holds them all.

    Args:
        members: The networks, e.g. a list or an `nn.ModuleList`; they are used, not copied.
        execution: `"loop"` calls the members one after another; `"vmap"` runs identical architectures as one
            vectorised computation (same results; pays on GPUs).
    """

    first_member = 0  # the index of members[0] among all M (forde.distributed's member-parallel ensemble: a share)

    def __init__(self, members: list[nn.Module], execution: str = "loop"):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.execution = "loop" if execution == "auto" else execution  # a run sets its device's choice (forde.device)

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every member on the same batch: [B, ...] -> [M, B, C]."""
        if self.execution == "vmap":
            return self._vmapped(x, shared_input=True)
        return torch.stack([m(x) for m in self.members])

    def forward_each(self, xs: torch.Tensor) -> torch.Tensor:
        """Member i on its own copy xs[i]: [M, B, ...] -> [M, B, C]."""
        if self.execution == "vmap":
            return self._vmapped(xs, shared_input=False)
        return torch.stack([m(x) for m, x in zip(self.members, xs)])

    def gather_members(self, t: torch.Tensor) -> torch.Tensor:
        """A per-member tensor `[M_here, ...]` of the members this process holds -> `[M, ...]` of all members:
        itself on one process (forde.distributed's member-parallel ensemble gathers it over the processes)."""
        return t

    def gather_examples(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """A tensor `[M_here, B_here, ...]` the members computed on the rows they ran of a `batch`-row batch (a
        method's own per-example quantity, e.g. hidden features) -> `[M, batch, ...]`: itself on one process
        (forde.distributed's ensembles gather it, with autograd, as they gather their outputs)."""
        return t

    def replicate(self, params: list[nn.Parameter]) -> None:
        """Mark parameters that several members share (one layer used by all): nothing to do on one process; a
        member-parallel process holds its own copy of them, kept equal to the others' (forde.distributed)."""

    def reduce_gradients(self) -> None:
        """After the backward pass, before the optimizer steps: nothing on one process (forde.distributed's
        ensembles exchange the gradients their processes share)."""

    def _vmapped(self, x: torch.Tensor, shared_input: bool) -> torch.Tensor:
        """The members as one computation on stacked copies of their parameters and buffers.

        Stacking is differentiable, so gradients reach each member's own parameters and the optimiser,
        checkpoints and everything else keep seeing M separate modules. Batch norm updates its running
        statistics in the stacked buffers (one slice per member); they are copied back afterwards.
        """
        template = self.members[0]
        names = [n for n, _ in template.named_parameters()]
        params = {n: torch.stack(ps) for n, ps in zip(names, zip(*(m.parameters() for m in self.members)))}
        buffer_names = [n for n, _ in template.named_buffers()]
        buffers = {n: torch.stack(bs) for n, bs in zip(buffer_names, zip(*(m.buffers() for m in self.members)))}

        def call(p, b, xi):
            return functional_call(template, (p, b), (xi,))

        with native_derivatives():  # vmap does not run custom autograd Functions
            out = vmap(call, in_dims=(0, 0, None if shared_input else 0))(params, buffers, x)
        if self.training and buffers:
            with torch.no_grad():
                for i, m in enumerate(self.members):
                    for b, n in zip(m.buffers(), buffer_names):
                        b.copy_(buffers[n][i])
        return out

    def output_gradients(
        self, x: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor], create_graph: bool = True
    ) -> InputGradients:
        """Outputs [M, B, C] and g[i, b] = d pick(outputs)[i, b] / d x_b flattened to [M, B, D].

        `pick` maps the outputs to the one scalar per member and sample that is differentiated. With
        `create_graph` the gradients stay differentiable w.r.t. the parameters, so a loss on them (a
        repulsion or penalty) backpropagates in the same backward pass as the data term.
        """
        if create_graph:
            self._refuse_compiled_members()
        xs = input_copies(x, len(self))
        with for_double_backward() if create_graph else contextlib.nullcontext():
            outputs = self.forward_each(xs)
        (grads,) = torch.autograd.grad(pick(outputs).sum(), xs, create_graph=create_graph)
        return InputGradients(outputs, grads.flatten(2))

    def _refuse_compiled_members(self) -> None:
        """One line instead of PyTorch's error mid-step: a torch.compile'd network has no second derivative
        (aot_autograd does not support double backward), which FoRDE's and LIT's input-gradient terms take."""
        for i, member in enumerate(self.members):
            if any(is_compiled(m) for m in member.modules()):
                raise ConfigError(
                    f"ensemble member {i} is compiled with torch.compile, which cannot be differentiated twice "
                    "(aot_autograd has no double backward), as the input-gradient terms of FoRDE and LIT are; build "
                    "the members without torch.compile (DE and the weight- and function-space RDEs may keep it)"
                )

    def input_gradients(
        self, x: torch.Tensor, y: torch.Tensor, target: str = "logit", create_graph: bool = True
    ) -> InputGradients:
        """Logits [M, B, C] and the input gradients [M, B, D] of the true-class output (see `true_class_output`).

        With `create_graph=False` the gradients are plain tensors, e.g. for `metrics.gradient_cosine_distance`."""
        return self.output_gradients(x, lambda logits: true_class_output(logits, y, target), create_graph)


def input_copies(x: torch.Tensor, members: int) -> torch.Tensor:
    """[B, ...] -> [members, B, ...]: one copy of the batch per member, a leaf that input gradients are taken on."""
    return x.detach().unsqueeze(0).expand(members, *x.shape).clone().requires_grad_(True)


def true_class_output(logits: torch.Tensor, y: torch.Tensor, target: str = "logit") -> torch.Tensor:
    """[M, B, C] -> [M, B]: the raw true-class logit, or its log-probability when `target` is log_prob."""
    outputs = logits.log_softmax(-1) if target == "log_prob" else logits
    return outputs.gather(-1, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)


def build_ensemble(cfg: ModelConfig, size: int, in_shape: tuple[int, ...], num_classes: int, seed: int) -> Ensemble:
    """Members initialised one after another from one seed: independent draws, reproducible as a whole."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Ensemble([build_model(cfg, in_shape, num_classes) for _ in range(size)], cfg.execution)
