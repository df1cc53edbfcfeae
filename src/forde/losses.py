"""The training methods as losses for your own loop: `loss_fn(members, x, y)` on any `nn.Module` members.

Each class wraps the method `forde train` runs (forde.methods), so the loss, its gradients and its statistics
are the training loop's own. Settings are keyword arguments named as the config's `method.*` keys, with the
same defaults and the same checks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from forde.config import KERNEL_METHODS, GradTarget, MedianMode, MethodConfig, validate_method
from forde.ensemble import Ensemble
from forde.methods.base import LossOutput, Method
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE
from forde.methods.likelihoods import Likelihood
from forde.methods.lit import LIT
from forde.methods.rde_function import FunctionRDE
from forde.methods.rde_weight import WeightRDE

Members = Ensemble | nn.ModuleList | Iterable[nn.Module]


def as_ensemble(members: Members) -> Ensemble:
    """`members` as an `Ensemble`: itself if it is one, else a wrapper around the same modules (no copies)."""
    if isinstance(members, Ensemble):
        return members
    if isinstance(members, nn.Module) and not isinstance(members, nn.ModuleList):
        raise TypeError(f"members: got one {type(members).__name__}; pass a list of the M member networks")
    members = list(members)
    if not members or not all(isinstance(m, nn.Module) for m in members):
        raise TypeError("members: expected a non-empty list (or nn.ModuleList) of nn.Module networks")
    return Ensemble(members)


class EnsembleLoss:
    """The loss of M members on one batch, called as `loss_fn(members, x, y)`; the methods below are its kinds."""

    def __init__(self, method: Method, cfg: MethodConfig):
        validate_method(cfg, None, prefix="")
        self.method, self.cfg = method, cfg

    def __call__(
        self, members: Members, x: torch.Tensor, y: torch.Tensor, *, step: int = 0, epoch: float = 0.0
    ) -> LossOutput:
        """The loss on one batch.

        Args:
            members: The M networks: an `Ensemble`, an `nn.ModuleList` or a list of modules, each mapping
                `x` to outputs `[B, C]`. Their train/eval mode is theirs to set, as in any loop.
            x: The batch of inputs, `[B, ...]`, as the members take it.
            y: The targets, `[B]`: class indices (or values, with a `Gaussian` likelihood).
            step: Optimizer steps taken so far, for `repulsion_every`.
            epoch: The fractional epoch (completed epochs + the share of this one), for the repulsion ramp.

        Returns:
            The loss to minimise, the members' outputs `[M, B, C]` and detached statistics.
        """
        ensemble = as_ensemble(members)
        self._check(ensemble, x)
        if self.cfg.name in KERNEL_METHODS and self.cfg.bandwidth is None and len(ensemble) < 2:
            raise ValueError(
                f"{len(ensemble)} member: the median-heuristic bandwidth divides by ln(M), so it needs at "
                "least 2 members; pass more members or a fixed bandwidth="
            )
        return self.method.loss(ensemble, x, y, step=step, epoch=epoch)

    def _check(self, ensemble: Ensemble, x: torch.Tensor) -> None:
        """One line naming what does not fit this loss in the members or the batch, before any computation."""


class DeepEnsembleLoss(EnsembleLoss):
    """Deep ensembles: the sum over members of each member's mean negative log-likelihood, no interaction.

    Args:
        likelihood: The data term; `Categorical()` (cross-entropy on logits) by default, `Gaussian(noise_std)`
            for regression with one output per sample.
    """

    def __init__(self, *, likelihood: Likelihood | None = None):
        super().__init__(DeepEnsemble(likelihood), MethodConfig(name="de"))


class FoRDELoss(EnsembleLoss):
    r"""FoRDE: Wasserstein gradient descent with a kernel on the members' input gradients.

    $$\mathcal{L} = \sum_i \frac{1}{B} \sum_b \mathrm{NLL}_{ib} + \frac{1}{B} \sum_i \log \sum_j k_{ij},$$

    where $k_{ij}$ compares member $i$'s and member $j$'s unit-normalised input gradients of the true-class
    logit, sample by sample, in the lengthscales of `projection` (the $j$ side held constant). Minimising it with SGD is FoRDE's update: each member follows its data gradient and is
    pushed away from the members whose input gradients resemble its own.

    Args:
        projection: P from `pca_projection` (PCA lengthscales), float `[D, D]` for inputs of D features, or
            None for the identity kernel (alpha = 0). Any device: a copy follows the gradients' device.
        bandwidth_scale: Multiplies the median-heuristic bandwidth.
        bandwidth: A fixed bandwidth instead of the median heuristic.
        median: The median heuristic per kernel column j (`"per_column"`, the release's) or over all pairs
            (`"all_pairs"`, the paper's).
        grad_target: The differentiated output: the true-class `"logit"` or its `"log_prob"`.
        eps: Gradients are normalised as $g / \sqrt{\lVert g \rVert^2 + \epsilon^2}$.
        repulsion_every: Add the repulsion (times k) on every k-th `step` only; plain steps in between.
        repulsion_subset: Share of each batch whose input gradients build the kernel (the data term sees it all).
        repulsion_ramp_start: Repulsion weight in epoch 0, falling linearly to 1 ...
        repulsion_ramp_epochs: ... over this many epochs (0: no ramp); pass `epoch=` to each call.
        likelihood: The data term and the differentiated output; `Categorical(grad_target)` by default.
    """

    def __init__(
        self,
        projection: torch.Tensor | None = None,
        *,
        bandwidth_scale: float = 1.0,
        bandwidth: float | None = None,
        median: MedianMode = "per_column",
        grad_target: GradTarget = "logit",
        eps: float = 1e-12,
        repulsion_every: int = 1,
        repulsion_subset: float = 1.0,
        repulsion_ramp_start: float = 1.0,
        repulsion_ramp_epochs: int = 0,
        likelihood: Likelihood | None = None,
    ):
        if projection is not None and (projection.dim() != 2 or not projection.is_floating_point()):
            raise ValueError(
                f"projection: expected a float [D, D] matrix from pca_projection (or None), got "
                f"{projection.dtype} {tuple(projection.shape)}"
            )
        cfg = MethodConfig(
            name="forde",
            bandwidth_scale=bandwidth_scale,
            bandwidth=bandwidth,
            median=median,
            grad_target=grad_target,
            eps=eps,
            repulsion_every=repulsion_every,
            repulsion_subset=repulsion_subset,
            repulsion_ramp_start=repulsion_ramp_start,
            repulsion_ramp_epochs=repulsion_ramp_epochs,
        )
        super().__init__(FoRDE(cfg, projection, likelihood), cfg)

    method: FoRDE

    def _check(self, ensemble: Ensemble, x: torch.Tensor) -> None:
        projection = self.method.projection
        if projection is not None and x[0].numel() != projection.shape[0]:
            raise ValueError(
                f"projection is [{projection.shape[0]}, {projection.shape[1]}] but the inputs have "
                f"{x[0].numel()} features per sample; compute it from inputs shaped like x"
            )


class WeightRDELoss(EnsembleLoss):
    """Weight-space repulsive deep ensemble (D'Angelo & Fortuin 2021): an RBF kernel on the members' flattened
    parameters, weighted against the data term as FoRDE's repulsion (1/B).

    Args:
        bandwidth_scale: Multiplies the median-heuristic bandwidth (median over all member pairs / ln M).
        bandwidth: A fixed bandwidth instead of the median heuristic.
        likelihood: The data term; `Categorical()` by default.
    """

    def __init__(
        self, *, bandwidth_scale: float = 1.0, bandwidth: float | None = None, likelihood: Likelihood | None = None
    ):
        cfg = MethodConfig(name="rde_weight", bandwidth_scale=bandwidth_scale, bandwidth=bandwidth)
        super().__init__(WeightRDE(cfg, likelihood), cfg)

    def _check(self, ensemble: Ensemble, x: torch.Tensor) -> None:
        sizes = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in ensemble.members]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"members with {sizes} trainable parameters: weight-space RDE compares the members' "
                "parameter vectors, so every member needs the same architecture"
            )


class FunctionRDELoss(EnsembleLoss):
    """Function-space repulsive deep ensemble (D'Angelo & Fortuin 2021): an RBF kernel on the members'
    predicted probabilities over the batch (predicted means for regression).

    Args:
        bandwidth_scale: Multiplies the median-heuristic bandwidth (median over all member pairs / ln M).
        bandwidth: A fixed bandwidth instead of the median heuristic.
        likelihood: The data term and the compared predictions; `Categorical()` by default.
    """

    def __init__(
        self, *, bandwidth_scale: float = 1.0, bandwidth: float | None = None, likelihood: Likelihood | None = None
    ):
        cfg = MethodConfig(name="rde_function", bandwidth_scale=bandwidth_scale, bandwidth=bandwidth)
        super().__init__(FunctionRDE(cfg, likelihood), cfg)


class LITLoss(EnsembleLoss):
    """LIT, local independent training (Ross et al. 2018): a penalty on the squared cosine similarity of the
    members' input gradients, `lit_weight * mean_b sum_{i<j} cos^2(g_ib, g_jb)`.

    Args:
        lit_weight: The penalty's weight, a hyperparameter to tune.
        grad_target: The differentiated output, as in `FoRDELoss`.
        eps: Gradients are normalised as g / sqrt(|g|^2 + eps^2) before the cosines.
        likelihood: The data term and the differentiated output; `Categorical(grad_target)` by default.
    """

    def __init__(
        self,
        *,
        lit_weight: float = 1.0,
        grad_target: GradTarget = "logit",
        eps: float = 1e-12,
        likelihood: Likelihood | None = None,
    ):
        cfg = MethodConfig(name="lit", lit_weight=lit_weight, grad_target=grad_target, eps=eps)
        super().__init__(LIT(cfg, likelihood), cfg)
