"""M members trained together: logits [M, B, C] and per-member input gradients [M, B, D].

The plain path runs the members one after another; it is the reference every faster execution
strategy is tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from forde.config import ModelConfig
from forde.models import build_model


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every member on the same batch: [B, ...] -> [M, B, C]."""
        return torch.stack([m(x) for m in self.members])

    def forward_each(self, xs: torch.Tensor) -> torch.Tensor:
        """Member i on its own copy xs[i]: [M, B, ...] -> [M, B, C]."""
        return torch.stack([m(x) for m, x in zip(self.members, xs)])

    def input_gradients(self, x: torch.Tensor, y: torch.Tensor, target: str = "logit", create_graph: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [M, B, C] and g[i, b] = d out_i(x_b)[y_b] / d x_b flattened to [M, B, D].

        `target` picks the differentiated output: the raw true-class logit or its log-probability.
        With `create_graph` the gradients stay differentiable w.r.t. the parameters, so a loss on
        them (the repulsion) backpropagates in the same backward pass as the cross-entropy.
        """
        xs = x.detach().unsqueeze(0).expand(len(self), *x.shape).clone().requires_grad_(True)
        logits = self.forward_each(xs)
        outputs = logits.log_softmax(-1) if target == "log_prob" else logits
        picked = outputs.gather(-1, y.view(1, -1, 1).expand(len(self), -1, 1))
        (grads,) = torch.autograd.grad(picked.sum(), xs, create_graph=create_graph)
        return logits, grads.flatten(2)


def build_ensemble(cfg: ModelConfig, size: int, in_shape: tuple[int, ...], num_classes: int, seed: int) -> Ensemble:
    """Members initialised one after another from one seed: independent draws, reproducible as a whole."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Ensemble([build_model(cfg, in_shape, num_classes) for _ in range(size)])
