"""What a training method is: a loss on (ensemble, batch). Everything else is the shared loop."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from forde.ensemble import Ensemble


class LossOutput(NamedTuple):
    """What an ensemble loss returns for one batch; a tuple, so `loss, outputs, stats = ...` works too.

    Attributes:
        loss: The scalar to minimise (call `.backward()` on it): the members' data terms plus the method's
            repulsion or penalty.
        outputs: The members' outputs on the batch, `[M, B, C]` (logits for classification), attached to
            the graph: reuse them for training accuracy instead of running the members again.
        stats: Detached scalars for logging: the data term (`"ce"`, or `"gaussian_nll"` for regression) and,
            for the repulsive methods, `"repulsion"`, `"bandwidth"` and `"kernel_offdiag"`.
    """

    loss: torch.Tensor
    outputs: torch.Tensor
    stats: dict[str, torch.Tensor]


class Method(Protocol):
    name: str

    def loss(
        self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, step: int = 0, epoch: float = 0.0
    ) -> LossOutput:
        """The loss on one batch. `step` counts optimizer steps from the start of training, for methods that
        act on some steps only; `epoch` is the fractional epoch (completed epochs + share of this one), for schedules."""
        ...


def ensemble_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over members of each member's mean cross-entropy: each member gets its own gradient, unscaled."""
    m, b, c = logits.shape
    return F.cross_entropy(logits.reshape(m * b, c), y.repeat(m), reduction="sum") / b
