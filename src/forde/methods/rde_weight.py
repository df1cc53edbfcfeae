"""Weight-space repulsive deep ensemble (D'Angelo & Fortuin 2021): WGD with an RBF kernel on the
members' flattened parameter vectors.

Loss = sum_i mean_b NLL_ib + (1/B) sum_i log sum_j k(theta_i, theta_j), j side held constant, so the
gradient for member i is the mean-NLL gradient plus (1/B) sum_j grad_i k_ij / sum_j k_ij: the WGD
update theta_i <- theta_i + lr (grad log p - sum_j grad_i k_ij / sum_j k_ij) divided by the batch
size. This is FoRDE's weighting of its repulsion against the mean cross-entropy, so the two methods
differ only in the kernel's features. (With full-batch training, 1/B = 1/N is exact WGD on the
posterior with the likelihood averaged over the data.) The prior is the optimizer's weight decay.

Bandwidth: h = bandwidth_scale * median_ij(|theta_i - theta_j|^2) / ln M (one bandwidth, the median
over all M x M pairs as in FoRDE's `all_pairs` mode), or the fixed `method.bandwidth`.
"""

from __future__ import annotations

import torch

from forde.config import MethodConfig
from forde.ensemble import Ensemble
from forde.kernels import repulsion
from forde.methods.base import LossOutput
from forde.methods.likelihoods import Categorical, Likelihood


def member_parameters(ensemble: Ensemble) -> torch.Tensor:
    """[M, 1, P]: each member's trainable parameters as one vector (one "sample" for the kernel). Buffers such
    as batch-norm statistics are not the particles' coordinates."""
    return ensemble.gather_members(
        torch.stack([torch.cat([p.reshape(-1) for p in m.parameters() if p.requires_grad]) for m in ensemble.members])
    ).unsqueeze(1)


class WeightRDE:
    name = "rde_weight"

    def __init__(self, cfg: MethodConfig, likelihood: Likelihood | None = None):
        self.cfg = cfg
        self.likelihood = likelihood or Categorical(cfg.grad_target)

    def loss(
        self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, step: int = 0, epoch: float = 0.0
    ) -> LossOutput:
        outputs = ensemble(x)
        nll = self.likelihood.nll(outputs, y)
        rep, stats = repulsion(
            member_parameters(ensemble),
            bandwidth=self.cfg.bandwidth,
            bandwidth_scale=self.cfg.bandwidth_scale,
            weight=1.0 / len(y),
        )
        return LossOutput(nll + rep, outputs, {self.likelihood.name: nll.detach(), "repulsion": rep.detach(), **stats})
