"""FoRDE: Wasserstein gradient descent with a kernel on the members' input gradients."""

from __future__ import annotations

import torch

from forde.config import MethodConfig
from forde.ensemble import Ensemble
from forde.kernels import repulsion, unit_normalize
from forde.methods.base import ensemble_cross_entropy


class FoRDE:
    """Loss = sum_i mean_b CE_ib + (1/B) sum_i log sum_j k_ij, one backward pass for both terms.

    `projection` is U diag(sqrt(w)) from the training data's PCA ([D, D]), or None for the identity
    kernel (alpha = 0).
    """

    name = "forde"

    def __init__(self, cfg: MethodConfig, projection: torch.Tensor | None):
        self.cfg = cfg
        self.projection = projection

    def features(self, grads: torch.Tensor) -> torch.Tensor:
        """Unit-normalised gradients in the lengthscale-weighted PCA coordinates: [M, B, D] -> [M, B, D]."""
        s = unit_normalize(grads, self.cfg.eps)
        return s if self.projection is None else s @ self.projection

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor):
        logits, grads = ensemble.input_gradients(x, y, self.cfg.grad_target, create_graph=True)
        ce = ensemble_cross_entropy(logits, y)
        rep, stats = repulsion(self.features(grads), bandwidth=self.cfg.bandwidth,
                               median_mode=self.cfg.median, bandwidth_scale=self.cfg.bandwidth_scale)
        return ce + rep, logits, {"ce": ce.detach(), "repulsion": rep.detach(), **stats}
