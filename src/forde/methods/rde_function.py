"""Function-space repulsive deep ensemble (D'Angelo & Fortuin 2021): WGD with an RBF kernel on the
members' predictions over the mini-batch.

Each member's function is represented by its softmax probabilities on the B batch inputs, flattened
to one B*C vector (D'Angelo & Fortuin's default; probabilities are bounded, so distances and the
median bandwidth stay well scaled, unlike logits which drift with the logit scale). For regression the
likelihood supplies the predicted means instead.

Loss = sum_i mean_b NLL_ib + (1/B) sum_i log sum_j k(f_i, f_j), j side held constant: autograd chains
the function-space repulsion sum_j grad_f k_ij / sum_j k_ij back to the weights through the Jacobian
of f_i, which is the function-space WGD update; 1/B weighs it as FoRDE weighs its repulsion (see
`rde_weight`). The prior is the optimizer's weight decay (no functional prior).
Bandwidth: h = bandwidth_scale * median_ij |f_i - f_j|^2 / ln M, or the fixed `method.bandwidth`.
"""

from __future__ import annotations

import torch

from forde.config import MethodConfig
from forde.ensemble import Ensemble
from forde.kernels import full_precision, kernel_dtype, repulsion
from forde.methods.base import LossOutput
from forde.methods.likelihoods import Categorical, Likelihood


class FunctionRDE:
    name = "rde_function"

    def __init__(self, cfg: MethodConfig, likelihood: Likelihood | None = None):
        self.cfg = cfg
        self.likelihood = likelihood or Categorical(cfg.grad_target)

    def loss(
        self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, step: int = 0, epoch: float = 0.0
    ) -> LossOutput:
        outputs = ensemble(x)
        nll = self.likelihood.nll(outputs, y)
        with full_precision(outputs):  # bf16 logits: the probabilities (and the kernel) in float32 at least
            f = self.likelihood.predictive(outputs.to(kernel_dtype(outputs))).reshape(len(ensemble), 1, -1)
        rep, stats = repulsion(
            f, bandwidth=self.cfg.bandwidth, bandwidth_scale=self.cfg.bandwidth_scale, weight=1.0 / len(y)
        )
        return LossOutput(nll + rep, outputs, {self.likelihood.name: nll.detach(), "repulsion": rep.detach(), **stats})
