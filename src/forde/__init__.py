"""FoRDE, first-order repulsive deep ensembles, for your own PyTorch models.

    import forde

    projection = forde.pca_projection(train_inputs, alpha=1.0)   # PCA lengthscales from the training inputs
    loss_fn = forde.FoRDELoss(projection)
    out = loss_fn(members, x, y)                                 # any list of nn.Module members
    out.loss.backward()

The losses (`FoRDELoss` and the baselines `DeepEnsembleLoss`, `WeightRDELoss`, `FunctionRDELoss`, `LITLoss`) are
the ones `forde train` minimises; `forde.metrics` holds the metrics it reports. Names are imported on first use,
so `import forde` (and the `forde` command) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forde import metrics
    from forde.data.pca import PCA, input_pca, pca_projection
    from forde.ensemble import Ensemble, InputGradients
    from forde.losses import DeepEnsembleLoss, EnsembleLoss, FoRDELoss, FunctionRDELoss, LITLoss, WeightRDELoss
    from forde.methods.base import LossOutput
    from forde.methods.likelihoods import Categorical, Gaussian

_PUBLIC = {
    "FoRDELoss": "forde.losses", "DeepEnsembleLoss": "forde.losses", "WeightRDELoss": "forde.losses",
    "FunctionRDELoss": "forde.losses", "LITLoss": "forde.losses", "EnsembleLoss": "forde.losses",
    "LossOutput": "forde.methods.base", "Categorical": "forde.methods.likelihoods", "Gaussian": "forde.methods.likelihoods",
    "pca_projection": "forde.data.pca", "input_pca": "forde.data.pca", "PCA": "forde.data.pca",
    "Ensemble": "forde.ensemble", "InputGradients": "forde.ensemble",
}
__all__ = [*_PUBLIC, "metrics"]


def __getattr__(name: str) -> Any:
    if name == "metrics":
        return importlib.import_module("forde.metrics")
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'forde' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
