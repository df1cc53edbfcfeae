"""Training methods: the only thing that differs between deep ensembles, FoRDE and the baselines."""

from __future__ import annotations

import torch

from forde.config import TrainConfig
from forde.data.base import Dataset
from forde.data.pca import dataset_pca, pca_projection
from forde.methods.base import Method
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE
from forde.methods.lit import LIT
from forde.methods.node_bnn import NodeBNN
from forde.methods.rde_feature import FeatureRDE
from forde.methods.rde_function import FunctionRDE
from forde.methods.rde_weight import WeightRDE
from forde.methods.swag import SWAG


def build_method(cfg: TrainConfig, dataset: Dataset, device: torch.device) -> Method:
    m = cfg.method
    if m.name == "de":
        return DeepEnsemble()
    if m.name == "forde":
        proj = None
        if m.alpha > 0:  # the PCA is computed (or read from its cache) only when the kernel uses it
            proj = pca_projection(dataset_pca(dataset, cfg.data.root), m.alpha, m.alpha_mix)
        return FoRDE(m, None if proj is None else proj.to(device))
    if m.name == "rde_weight":
        return WeightRDE(m)
    if m.name == "rde_function":
        return FunctionRDE(m)
    if m.name == "rde_feature":
        return FeatureRDE(m)
    if m.name == "swag":
        return SWAG(m)
    if m.name == "node_bnn":
        return NodeBNN(m, len(dataset.train), cfg.optim.epochs, cfg.seed)
    if m.name == "lit":
        return LIT(m)
    raise ValueError(f"method.name = {m.name!r}: unknown method")
