"""The two toy data sets: Izmailov et al.'s (2019) 1-D regression and D'Angelo & Fortuin's (2021)
five Gaussian clusters on a pentagon."""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import torch

REGRESSION_ASSET = ("data", "assets", "toy_regression_1d", "data.csv")


def regression_1d() -> tuple[torch.Tensor, torch.Tensor]:
    """The 400 published points (x, y) as float64 [N] tensors: three clusters of x with gaps between."""
    text = resources.files("forde").joinpath(*REGRESSION_ASSET).read_text()
    data = np.loadtxt(text.splitlines()[1:], delimiter=",")
    return torch.from_numpy(data[:, 0]), torch.from_numpy(data[:, 1])


def regression_features(x: torch.Tensor) -> torch.Tensor:
    """(x/2, (x/2)^2), the network inputs of Izmailov et al. Also what gives FoRDE's unit-normalised
    gradients a direction here: w.r.t. a scalar input they normalise to +-1. Caveat: the inputs only
    ever lie on this parabola, so part of the gradient (across it) never affects f(x) on any x."""
    u = x / 2.0
    return torch.stack([u, u.square()], -1)


def pentagon_clusters(
    n_per_class: int = 40, radius: float = 5.0, std: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Five isotropic Gaussian clusters (one class each) centred on a regular pentagon of the given
    radius, the first at the top: inputs float64 [5n, 2], labels int64 [5n]."""
    g = torch.Generator().manual_seed(seed)
    angles = math.pi / 2 + 2 * math.pi * torch.arange(5, dtype=torch.float64) / 5
    centres = radius * torch.stack([angles.cos(), angles.sin()], -1)
    x = centres.repeat_interleave(n_per_class, 0) + std * torch.randn(
        5 * n_per_class, 2, generator=g, dtype=torch.float64
    )
    y = torch.arange(5).repeat_interleave(n_per_class)
    return x, y
