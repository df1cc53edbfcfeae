"""How an ensemble's outputs meet the data: the data term, the output whose input gradient the
gradient-based methods use, and the function values that function-space methods compare.

Classification (the benchmarks) uses `Categorical`; the 1-D regression illustration uses `Gaussian`.
Keeping these three choices in one object lets every method serve both tasks unchanged.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from forde.ensemble import true_class_output
from forde.methods.base import ensemble_cross_entropy


class Likelihood(Protocol):
    name: str  # key of the data term in the logged statistics

    def nll(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum over members of each member's mean negative log-likelihood, outputs [M, B, C]."""
        ...

    def pick(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[M, B, C] -> [M, B]: the output whose gradient w.r.t. the input is repelled or penalised."""
        ...

    def predictive(self, outputs: torch.Tensor) -> torch.Tensor:
        """[M, B, C] -> [M, B, K]: the function values a function-space kernel compares."""
        ...


class Categorical:
    """Softmax classification: cross-entropy on logits; input gradients of the true-class logit.

    Args:
        grad_target: The differentiated output: the true-class `"logit"` or its `"log_prob"`.
    """

    name = "ce"

    def __init__(self, grad_target: str = "logit"):
        self.grad_target = grad_target

    def nll(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ensemble_cross_entropy(outputs, y)

    def pick(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return true_class_output(outputs, y, self.grad_target)

    def predictive(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.softmax(-1)


class Gaussian:
    """Regression with a fixed noise level: one output per sample, the predictive mean.

    The input gradient is that of the mean itself (there is no class to pick), and function-space
    kernels compare the means.

    Args:
        noise_std: The observation noise's standard deviation, in the targets' units.
    """

    name = "gaussian_nll"

    def __init__(self, noise_std: float):
        self.noise_std = noise_std

    def nll(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean = outputs.squeeze(-1)  # [M, B]
        sq = (mean - y.to(mean.dtype).view(1, -1)).square()
        per_sample = 0.5 * sq / self.noise_std**2 + math.log(self.noise_std) + 0.5 * math.log(2 * math.pi)
        return per_sample.mean(1).sum()

    def pick(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return outputs.squeeze(-1)

    def predictive(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs
