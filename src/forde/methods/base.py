"""What a training method is: a loss on (ensemble, batch). Everything else is the shared loop."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from forde.ensemble import Ensemble


class Method(Protocol):
    name: str

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, step: int = 0, epoch: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (loss to minimise, member logits [M, B, C], detached statistics for logging).
        `step` counts optimizer steps from the start of training, for methods that act on some steps only;
        `epoch` is the fractional epoch (completed epochs + share of this one), for schedules."""
        ...


def ensemble_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over members of each member's mean cross-entropy: each member gets its own gradient, unscaled."""
    m, b, c = logits.shape
    return F.cross_entropy(logits.reshape(m * b, c), y.repeat(m), reduction="sum") / b
