"""FoRDE: Wasserstein gradient descent with a kernel on the members' input gradients."""

from __future__ import annotations

import torch

from forde.config import MethodConfig
from forde.ensemble import Ensemble
from forde.kernels import repulsion, unit_normalize
from forde.methods.likelihoods import Categorical, Likelihood


class FoRDE:
    """Loss = sum_i mean_b NLL_ib + (1/B) sum_i log sum_j k_ij, one backward pass for both terms.

    `projection` is U diag(sqrt(w)) from the training data's PCA ([D, D]), or None for the identity
    kernel (alpha = 0). The likelihood (default: classification) picks the differentiated output.
    """

    name = "forde"

    def __init__(self, cfg: MethodConfig, projection: torch.Tensor | None, likelihood: Likelihood | None = None):
        self.cfg = cfg
        self.projection = projection
        self.likelihood = likelihood or Categorical(cfg.grad_target)

    def features(self, grads: torch.Tensor) -> torch.Tensor:
        """Unit-normalised gradients in the lengthscale-weighted PCA coordinates: [M, B, D] -> [M, B, D]."""
        s = unit_normalize(grads, self.cfg.eps)
        return s if self.projection is None else s @ self.projection

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor):
        outputs, grads = ensemble.output_gradients(x, lambda out: self.likelihood.pick(out, y), create_graph=True)
        nll = self.likelihood.nll(outputs, y)
        rep, stats = repulsion(self.features(grads), bandwidth=self.cfg.bandwidth,
                               median_mode=self.cfg.median, bandwidth_scale=self.cfg.bandwidth_scale)
        return nll + rep, outputs, {self.likelihood.name: nll.detach(), "repulsion": rep.detach(), **stats}
