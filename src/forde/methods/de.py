"""Deep ensembles: members trained independently, side by side."""

from __future__ import annotations

from forde.ensemble import Ensemble
from forde.methods.base import LossOutput
from forde.methods.likelihoods import Categorical, Likelihood


class DeepEnsemble:
    name = "de"

    def __init__(self, likelihood: Likelihood | None = None):
        self.likelihood = likelihood or Categorical()

    def loss(self, ensemble: Ensemble, x, y, step: int = 0, epoch: float = 0.0) -> LossOutput:
        outputs = ensemble(x)
        nll = self.likelihood.nll(outputs, y)
        return LossOutput(nll, outputs, {self.likelihood.name: nll.detach()})
