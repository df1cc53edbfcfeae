"""LIT, local independent training (Ross et al. 2018): a penalty on the squared cosine similarity of
the members' input gradients.

Loss = sum_i mean_b NLL_ib + lit_weight * mean_b sum_{i<j} cos^2(g_ib, g_jb).

Unlike the repulsive methods this is a plain penalty (both members of a pair receive its gradient)
and its weight `method.lit_weight` is a hyperparameter to tune. The input gradient is the one FoRDE
uses (the true-class output chosen by `method.grad_target`), so the two methods differ only in how
they push the gradients apart; cosines are taken of gradients normalised as FoRDE normalises them,
g / sqrt(|g|^2 + eps^2), which keeps the penalty finite where a gradient vanishes. Like FoRDE's kernel,
the penalty is computed in `kernels.kernel_dtype` with autocast off.
"""

from __future__ import annotations

import torch

from forde.config import MethodConfig
from forde.ensemble import Ensemble
from forde.kernels import full_precision, kernel_dtype, unit_normalize
from forde.methods.base import LossOutput
from forde.methods.likelihoods import Categorical, Likelihood


def squared_cosine_penalty(grads: torch.Tensor, eps: float) -> torch.Tensor:
    """mean over samples of sum over member pairs i < j of cos^2(g_ib, g_jb), grads [M, B, D]."""
    m = grads.shape[0]
    with full_precision(grads):
        s = unit_normalize(grads.to(kernel_dtype(grads)), eps)
        cos = torch.einsum("ibd,jbd->bij", s, s)
        i, j = torch.triu_indices(m, m, offset=1, device=grads.device)
        return cos[:, i, j].square().sum(1).mean()


class LIT:
    name = "lit"

    def __init__(self, cfg: MethodConfig, likelihood: Likelihood | None = None):
        self.cfg = cfg
        self.likelihood = likelihood or Categorical(cfg.grad_target)

    def loss(
        self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, step: int = 0, epoch: float = 0.0
    ) -> LossOutput:
        outputs, grads = ensemble.output_gradients(x, lambda out: self.likelihood.pick(out, y), create_graph=True)
        nll = self.likelihood.nll(outputs, y)
        penalty = self.cfg.lit_weight * squared_cosine_penalty(grads, self.cfg.eps)
        return LossOutput(nll + penalty, outputs, {self.likelihood.name: nll.detach(), "repulsion": penalty.detach()})
