"""Deep ensembles: members trained independently, side by side."""

from __future__ import annotations

import torch

from forde.ensemble import Ensemble
from forde.methods.base import ensemble_cross_entropy


class DeepEnsemble:
    name = "de"

    def loss(self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor):
        logits = ensemble(x)
        ce = ensemble_cross_entropy(logits, y)
        return ce, logits, {"ce": ce.detach()}
