"""FoRDE: Wasserstein gradient descent with a kernel on the members' input gradients."""

from __future__ import annotations

import contextlib
import math

import torch

from forde.config import MethodConfig
from forde.ensemble import Ensemble
from forde.kernels import full_precision, kernel_dtype, repulsion, unit_normalize
from forde.methods.base import LossOutput
from forde.methods.likelihoods import Categorical, Likelihood


class FoRDE:
    """Loss = sum_i mean_b NLL_ib + (1/B) sum_i log sum_j k_ij, one backward pass for both terms.

    The release's first commit multiplied the repulsion by a weight falling linearly from
    `repulsion_ramp_start` in epoch 0 to 1 after `repulsion_ramp_epochs` (see `repulsion_weight`).

    Two cheaper approximations, off by default: `repulsion_every = k` adds the repulsion (times k) on
    every k-th step only; `repulsion_subset = s < 1` builds the kernel from a separate pass over the
    first s*B samples of the batch while the data term still sees all of it.

    `projection` is U diag(sqrt(w)) from the training data's PCA ([D, D]), or None for the identity
    kernel (alpha = 0). The likelihood (default: classification) picks the differentiated output.
    Features and kernel are computed in `kernels.kernel_dtype` with autocast off, whatever the networks' precision.
    """

    name = "forde"

    def __init__(self, cfg: MethodConfig, projection: torch.Tensor | None, likelihood: Likelihood | None = None):
        self.cfg = cfg
        self.projection = projection
        self.likelihood = likelihood or Categorical(cfg.grad_target)
        self._projections: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def features(self, grads: torch.Tensor) -> torch.Tensor:
        """Unit-normalised gradients in the lengthscale-weighted PCA coordinates: [M, B, D] -> [M, B, D]."""
        with full_precision(grads):
            s = unit_normalize(grads.to(kernel_dtype(grads)), self.cfg.eps)
            return s if self.projection is None else s @ self._projection(s.dtype, s.device)

    def _projection(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        projection = self.projection
        assert projection is not None  # features() asks only when there is one
        if projection.dtype == dtype and projection.device == device:
            return projection
        key = (dtype, device)  # one copy per dtype and device asked for, e.g. float64 under TF32, or a
        if key not in self._projections:  # projection computed on the CPU for members on a GPU
            self._projections[key] = projection.to(device=device, dtype=dtype)
        return self._projections[key]

    def step_kind(self, step: int) -> bool:
        """Whether `step` is a repulsion step: the two kinds of step are two different computations."""
        return step % self.cfg.repulsion_every == 0

    def loss(
        self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, step: int = 0, epoch: float = 0.0
    ) -> LossOutput:
        cfg, batch = self.cfg, len(y)
        if not self.step_kind(step):  # a plain data step between repulsion steps
            outputs = ensemble(x)
            nll = self.likelihood.nll(outputs, y)
            return LossOutput(nll, outputs, {self.likelihood.name: nll.detach()})

        def pick(out, target):
            return self.likelihood.pick(out, target)

        if cfg.repulsion_subset >= 1.0:
            outputs, grads = ensemble.output_gradients(x, lambda out: pick(out, y), create_graph=True)
        else:  # data term on the whole batch, kernel on its first k samples (the batch is already shuffled)
            k = max(2, round(cfg.repulsion_subset * batch))
            outputs = ensemble(x)
            with batch_stats_only(ensemble):
                _, grads = ensemble.output_gradients(x[:k], lambda out: pick(out, y[:k]), create_graph=True)
        nll = self.likelihood.nll(outputs, y)
        ramp = repulsion_weight(epoch, cfg.repulsion_ramp_start, cfg.repulsion_ramp_epochs)
        rep, stats = repulsion(
            self.features(grads),
            bandwidth=cfg.bandwidth,
            median_mode=cfg.median,
            bandwidth_scale=cfg.bandwidth_scale,
            weight=ramp * cfg.repulsion_every / batch,
        )
        if cfg.repulsion_ramp_epochs > 0:
            stats["repulsion_weight"] = torch.tensor(ramp)
        return LossOutput(nll + rep, outputs, {self.likelihood.name: nll.detach(), "repulsion": rep.detach(), **stats})


def repulsion_weight(epoch: float, start: float, epochs: int) -> float:
    """The first public commit's schedule: start + e (1 - start) / epochs in epoch e = 0, 1, ... (constant
    within an epoch), and 1 from epoch `epochs` on. It multiplies the repulsion and so its gradient."""
    e = math.floor(epoch)
    return start + e * (1.0 - start) / epochs if e < epochs else 1.0


@contextlib.contextmanager
def batch_stats_only(module: torch.nn.Module):
    """Batch norm normalises with batch statistics but leaves its running statistics alone: the extra
    pass over a subset of the batch must not count as a second training batch."""
    norms = [
        m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
