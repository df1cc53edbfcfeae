"""Feature-space repulsive deep ensemble (Yashima et al., ICML 2022, "Feature space particle inference"): WGD
whose kernel compares the members' hidden features on the training batch, as the authors' public code does it.

The FoRDE paper's Feature-RDE rows (appendix C.2) fix a Cauchy feature prior of scale 1e-3 (CIFAR-10) or 5e-3
(CIFAR-100, Tiny-ImageNet) and a projection dimension of 5, which are the settings of Yashima et al.'s code; the
rest follows that code (DensoITLab/featurePI, `lib/optim/feature_wgd.py`):

- Features F_i [B, d]: the input of each member's last `nn.Linear`, the classifier (for a ResNet the globally
  average-pooled output of the last stage). The classifier is one module *shared* by all members
  (`method.feature_shared_head`); its gradient is the members' mean, the encoders' their own.
- Projection: G_i = d(sum_b CE_ib)/dF_i; with the Gram matrix C = [<G_i, G_j>] = U diag(w) U^T (eigenvalues in
  ascending order, as `eigh` returns them), the basis vectors e_k = sum_i U_ik G_i / sqrt(w_k) are orthonormal,
  and the first `method.feature_projection_dim` of them are kept (so the smallest-eigenvalue directions, as
  coded). z_i = [<F_i, e_k>]_k. The basis is a constant of the step.
- Kernel: k_ij = exp(-|z_i - z_j|^2 / h_i) with h_i = median_j(|z_i - z_j|^2)^2 / ln M + 1e-12 (the squared
  median, as coded; times `method.bandwidth_scale`), or the fixed `method.bandwidth`.
- Update: dL/dF_i = [d sum_b CE_ib + d sum log(1 + s F_i^2) + d log sum_j k_ij] / B, j side held constant: the
  WGD step in feature space with a Cauchy prior of scale s = `method.feature_prior_scale`, no repulsion
  coefficient; autograd carries it into each encoder. Weight decay is the optimizer's, on every parameter.

Choices the sources leave open, made here: the eigenvalues are floored at 1e-30 (a member whose classifier
gradient vanishes, e.g. a zero-initialised classifier in the first step, gives w = 0 and the code's 1/sqrt(w)
would be infinite); the projection is computed in float64 (an M x M eigenproblem, negligible cost).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from forde.config import ConfigError, MethodConfig
from forde.ensemble import Ensemble
from forde.kernels import MIN_BANDWIDTH, full_precision, kernel_dtype, median
from forde.methods.base import LossOutput
from forde.methods.likelihoods import Categorical, Likelihood

MIN_EIGENVALUE = 1e-30


def classifier_head(member: nn.Module, index: int) -> tuple[str, nn.Linear]:
    """The member's last `nn.Linear` (its dotted path and the module): the layer whose input is the feature."""
    linear = [(name, m) for name, m in member.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError(
            f"method.name = rde_feature repels the input of the network's last nn.Linear layer (its features), but "
            f"ensemble member {index} has no nn.Linear; use a network whose classifier is an nn.Linear"
        )
    return linear[-1]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def feature_projection(grads: torch.Tensor, dim: int) -> torch.Tensor:
    """[M, N] likelihood gradients -> [min(dim, M), N] orthonormal basis (see the module docstring), float64."""
    g = grads.detach().double()
    w, u = torch.linalg.eigh(g @ g.T)
    basis = (u.T @ g) / w.clamp_min(MIN_EIGENVALUE).sqrt()[:, None]
    return basis[:dim]


def feature_repulsion(
    features: torch.Tensor, grads: torch.Tensor, dim: int, bandwidth: float | None = None, scale: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_i log sum_j k_ij on features [M, N] projected by `feature_projection(grads)`, j side and h constant;
    `scale` multiplies the median-heuristic bandwidth (1: the authors')."""
    m = features.shape[0]
    basis = feature_projection(grads, dim).to(features.dtype)
    z = features @ basis.T  # [M, k]
    d = (z[:, None, :] - z.detach()[None, :, :]).square().sum(-1)  # d[i, j] = |z_i - z_j|^2
    d_const = d.detach()
    if bandwidth is not None:
        h = torch.full((m, 1), bandwidth, dtype=d.dtype, device=d.device)
    else:
        h = (scale * median(d_const, dim=1).square() / math.log(m) + MIN_BANDWIDTH).unsqueeze(1)
    k = torch.exp(-d / h)
    off = (k.detach().sum() - k.detach().diagonal().sum()) / max(m * (m - 1), 1)
    return k.sum(1).log().sum(), {"bandwidth": h.mean().detach(), "kernel_offdiag": off}


class FeatureRDE:
    name = "rde_feature"

    def __init__(self, cfg: MethodConfig, likelihood: Likelihood | None = None):
        self.cfg = cfg
        self.likelihood = likelihood or Categorical(cfg.grad_target)
        self._heads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) per classifier call
        self._outputs: list[torch.Tensor] = []  # each member's output, in the order the members ran
        self._recording = False
        self._attached: Ensemble | None = None

    def attach(self, ensemble: Ensemble) -> None:
        """Share the classifier (when asked) and record each member's feature: before the optimizer is built."""
        if ensemble.execution == "vmap":
            raise ConfigError(
                "method.name = rde_feature reads each member's features as it runs, which a vectorised ensemble "
                "does not allow; set model.execution=loop"
            )
        heads = [classifier_head(member, i) for i, member in enumerate(ensemble.members)]
        if self.cfg.feature_shared_head and len(ensemble) > 1:
            shared = heads[0][1]
            for member, (path, _) in zip(ensemble.members[1:], heads[1:]):
                set_submodule(member, path, shared)
            scale = 1.0 / len(ensemble)
            for p in shared.parameters():  # the shared classifier learns from the members' mean loss
                p.register_hook(lambda g: g * scale)
            ensemble.replicate(list(shared.parameters()))  # one classifier, also over processes holding members
            heads = [(path, shared) for path, _ in heads]
        for head in {id(h): h for _, h in heads}.values():  # a shared classifier runs once per member
            head.register_forward_hook(self._record_head)
        for member in ensemble.members:
            member.register_forward_hook(self._record_output)
        self._attached = ensemble

    def _record_head(self, module, inputs, output) -> None:
        if self._recording:
            self._heads.append((inputs[0], output))

    def _record_output(self, module, inputs, output) -> None:
        if self._recording:
            self._outputs.append(output)

    def member_features(self, ensemble: Ensemble, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs [M, B, C] and the features [B_here, ...] (classifier inputs) of the members this process runs,
        on the rows it runs (all of them on one process), in one pass of the ensemble."""
        if self._attached is not ensemble:
            raise RuntimeError("FeatureRDE.attach(ensemble) must run first, before the optimizer is built")
        self._heads, self._outputs, self._recording = [], [], True
        try:
            outputs = ensemble(x)
            heads, members = self._heads, self._outputs
        finally:
            self._heads, self._outputs, self._recording = [], [], False
        if len(heads) != len(members) or any(head is not out for (_, head), out in zip(heads, members)):
            raise ConfigError(
                "method.name = rde_feature: a member's output is not the output of its last nn.Linear "
                "(the network transforms it further, or calls that layer more than once); use a network that "
                "returns its classifier's output"
            )
        return outputs, [feature for feature, _ in heads]

    def loss(
        self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, step: int = 0, epoch: float = 0.0
    ) -> LossOutput:
        cfg, batch = self.cfg, len(y)
        outputs, features = self.member_features(ensemble, x)
        nll = self.likelihood.nll(outputs, y)
        grads = torch.autograd.grad(nll * batch, features, retain_graph=True)  # d sum_b NLL_ib / dF_i
        # [M, B * d]: every member's features on the whole batch (gathered where processes share the work)
        f = ensemble.gather_examples(torch.stack([t.flatten(1) for t in features]), batch).flatten(1)
        with full_precision(f):
            f = f.to(kernel_dtype(f))
            prior = torch.log1p(cfg.feature_prior_scale * f.square()).sum()
            g = ensemble.gather_examples(torch.stack([t.flatten(1) for t in grads]), batch).flatten(1)
            rep, stats = feature_repulsion(f, g, cfg.feature_projection_dim, cfg.bandwidth, cfg.bandwidth_scale)
        loss = nll + (prior + rep) / batch
        return LossOutput(
            loss,
            outputs,
            {
                self.likelihood.name: nll.detach(),
                "repulsion": rep.detach() / batch,
                "feature_prior": prior.detach() / batch,
                **stats,
            },
        )
