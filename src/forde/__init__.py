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

if TYPE_CHECKING:  # `X as X`: re-exported for type checkers; at run time __getattr__ imports them
    from forde import metrics as metrics
    from forde.data.pca import PCA as PCA
    from forde.data.pca import input_pca as input_pca
    from forde.data.pca import pca_projection as pca_projection
    from forde.ensemble import Ensemble as Ensemble
    from forde.ensemble import InputGradients as InputGradients
    from forde.losses import DeepEnsembleLoss as DeepEnsembleLoss
    from forde.losses import EnsembleLoss as EnsembleLoss
    from forde.losses import FoRDELoss as FoRDELoss
    from forde.losses import FunctionRDELoss as FunctionRDELoss
    from forde.losses import LITLoss as LITLoss
    from forde.losses import WeightRDELoss as WeightRDELoss
    from forde.methods.base import LossOutput as LossOutput
    from forde.methods.likelihoods import Categorical as Categorical
    from forde.methods.likelihoods import Gaussian as Gaussian

_PUBLIC = {
    "FoRDELoss": "forde.losses",
    "DeepEnsembleLoss": "forde.losses",
    "WeightRDELoss": "forde.losses",
    "FunctionRDELoss": "forde.losses",
    "LITLoss": "forde.losses",
    "EnsembleLoss": "forde.losses",
    "LossOutput": "forde.methods.base",
    "Categorical": "forde.methods.likelihoods",
    "Gaussian": "forde.methods.likelihoods",
    "pca_projection": "forde.data.pca",
    "input_pca": "forde.data.pca",
    "PCA": "forde.data.pca",
    "Ensemble": "forde.ensemble",
    "InputGradients": "forde.ensemble",
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
