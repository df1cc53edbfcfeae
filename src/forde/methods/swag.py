"""SWAG (Maddox et al., NeurIPS 2019) for every member: MultiSWAG, an ensemble of SWAG posteriors.

Training is a deep ensemble's. From the end of epoch e > `swag_start` x epochs on, each member's parameter
vector theta is collected once per epoch into its running moments (the reference code, wjmaddox/swa_gaussian:
collection after epoch 161 of 300, every epoch):
    mean <- (n mean + theta) / (n + 1),  sq_mean <- (n sq_mean + theta^2) / (n + 1),  D[:, n mod K] = theta - mean
keeping the last K = `swag_rank` deviations. The moments are buffers of the ensemble (`ensemble.swag`), so they
travel in checkpoints and a resumed run continues them exactly. The learning rate is the run's schedule
(`optim.*`); the built-in studies set the reference's: constant, then linear to swa_lr between 0.5 and 0.9 of
swag_start, then constant.

Evaluation draws S = `swag_samples` parameter vectors per member,
    theta_s = mean + sqrt(scale) (sigma * z1 + D z2 / sqrt(K - 1)),  sigma^2 = max(sq_mean - mean^2, 1e-30)
(scale = `swag_scale`, 0.5 in the reference), refreshes batch-norm statistics for each draw by one pass over the
training data in training mode with a cumulative average (the reference's `bn_update`), and averages the
probabilities over the draws: each member's prediction is its SWAG model average, the ensemble's the mean over
members. Draws come from a generator seeded by (run seed, draw, member), so evaluations repeat exactly; a draw's
parameters are regenerated on the device whenever used (cheap next to a forward pass) and only its batch-norm
statistics are kept, so memory stays that of one ensemble.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import cast

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from forde.config import ConfigError, MethodConfig
from forde.data.pipeline import DeviceLoader
from forde.ensemble import Ensemble
from forde.methods.base import LossOutput
from forde.methods.likelihoods import Categorical, Likelihood

MIN_VARIANCE = 1e-30


def trainable(member: nn.Module) -> list[nn.Parameter]:
    return [p for p in member.parameters() if p.requires_grad]


class MemberMoments(nn.Module):
    """One member's SWAG moments: mean, mean of squares and the last `rank` deviations, as buffers."""

    mean: torch.Tensor
    sq_mean: torch.Tensor
    deviations: torch.Tensor
    collected: torch.Tensor

    def __init__(self, member: nn.Module, rank: int):
        super().__init__()
        theta = parameters_to_vector(trainable(member)).detach()
        self.register_buffer("mean", torch.zeros_like(theta))
        self.register_buffer("sq_mean", torch.zeros_like(theta))
        self.register_buffer("deviations", theta.new_zeros(rank, theta.numel()))
        self.register_buffer("collected", torch.zeros((), dtype=torch.int64, device=theta.device))

    @torch.no_grad()
    def collect(self, member: nn.Module) -> None:
        theta = parameters_to_vector(trainable(member)).to(self.mean.dtype)
        n = int(self.collected)
        self.mean.mul_(n / (n + 1)).add_(theta / (n + 1))
        self.sq_mean.mul_(n / (n + 1)).add_(theta.square() / (n + 1))
        if len(self.deviations):
            self.deviations[n % len(self.deviations)] = theta - self.mean
        self.collected += 1

    @torch.no_grad()
    def sample(self, scale: float, generator: torch.Generator) -> torch.Tensor:
        sigma = (self.sq_mean - self.mean.square()).clamp_min(MIN_VARIANCE).sqrt()
        z1 = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        noise = sigma * z1
        rank = len(self.deviations)
        if rank:
            z2 = torch.randn(rank, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
            noise += self.deviations.T @ z2 / math.sqrt(rank - 1)
        return self.mean + math.sqrt(scale) * noise


def member_moments(ensemble: Ensemble) -> list[MemberMoments]:
    """The moments `SWAG.attach` put on the ensemble, one per member."""
    return [cast(MemberMoments, m) for m in cast(nn.ModuleList, ensemble.get_submodule("swag"))]


class SWAG:
    name = "swag"

    def __init__(self, cfg: MethodConfig, likelihood: Likelihood | None = None):
        self.cfg = cfg
        self.likelihood = likelihood or Categorical()

    def attach(self, ensemble: Ensemble) -> None:
        """Moment buffers per member, registered on the ensemble (so checkpoints and `.to()` carry them)."""
        ensemble.swag = nn.ModuleList([MemberMoments(m, self.cfg.swag_rank) for m in ensemble.members])

    def loss(self, ensemble: Ensemble, x, y, step: int = 0, epoch: float = 0.0) -> LossOutput:
        outputs = ensemble(x)
        nll = self.likelihood.nll(outputs, y)
        return LossOutput(nll, outputs, {self.likelihood.name: nll.detach()})

    def collects_after(self, epoch: int, epochs: int) -> bool:
        """Whether the moments take the parameters at the end of (1-based) epoch `epoch`."""
        return epoch > self.cfg.swag_start * epochs

    def end_epoch(self, ensemble: Ensemble, epoch: int, epochs: int) -> dict:
        if not self.collects_after(epoch, epochs):
            return {}
        moments = member_moments(ensemble)
        for m, member in zip(moments, ensemble.members):
            m.collect(member)
        return {"swag/collected": int(moments[0].collected)}

    def sampler(self, setup) -> SWAGSampler:
        """The final evaluation's draws; batch-norm statistics are refreshed on the training data as it is trained
        on (shuffled, augmented when the run augments), a fixed order per draw."""
        cfg, device = setup.cfg, setup.device

        def refresh_batches(draw: int) -> Iterator[torch.Tensor]:
            loader = DeviceLoader(
                setup.dataset.train,
                cfg.optim.batch_size,
                setup.dataset.mean,
                setup.dataset.std,
                device if cfg.data.on_device else "cpu",
                shuffle=True,
                augment=cfg.data.augment,
                seed=draw_seed(cfg.seed, draw, 0),
            )
            for x, _ in loader:
                yield setup.prepare(x.to(device, non_blocking=True))

        return SWAGSampler(setup.ensemble, self.cfg, cfg.seed, refresh_batches, setup.autocast)


def draw_seed(seed: int, *keys: int) -> int:
    """A generator seed for the run's `seed` and e.g. (draw, member): distinct keys, independent streams."""
    for key in keys:
        seed = seed * 1_000_003 + key
    return seed % (2**63)


class SWAGSampler:
    """`use(s)` sets every member to its s-th SWAG draw (with batch-norm statistics refreshed) for the block."""

    def __init__(
        self,
        ensemble: Ensemble,
        cfg: MethodConfig,
        seed: int,
        refresh_batches: Callable[[int], Iterable[torch.Tensor]],
        autocast: Callable[[], contextlib.AbstractContextManager],
    ):
        if int(member_moments(ensemble)[0].collected) == 0:
            raise ConfigError(
                f"SWAG collected no parameters: method.swag_start = {cfg.swag_start} leaves no epoch to collect "
                "in; lower method.swag_start (the reference collects after 161 of 300 epochs: 0.537)"
            )
        self.ensemble, self.cfg, self.seed = ensemble, cfg, seed
        self.samples = cfg.swag_samples
        self.refresh_batches, self.autocast = refresh_batches, autocast
        self.statistics: dict[int, list[list[torch.Tensor]]] = {}  # draw -> member -> its buffers

    def _set_parameters(self, draw: int) -> None:
        for i, (member, moments) in enumerate(zip(self.ensemble.members, member_moments(self.ensemble))):
            seed = draw_seed(self.seed, draw, self.ensemble.first_member + i)  # i-th of the members held here
            generator = torch.Generator(device=moments.mean.device).manual_seed(seed)
            theta = moments.sample(self.cfg.swag_scale, generator)
            vector_to_parameters(theta.to(trainable(member)[0].dtype), trainable(member))

    @torch.no_grad()
    def _refresh_statistics(self, draw: int) -> list[list[torch.Tensor]]:
        norms = [m for m in self.ensemble.members.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            momenta = [m.momentum for m in norms]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the pass
            self.ensemble.train()
            try:
                for x in self.refresh_batches(draw):
                    with self.autocast():
                        self.ensemble(x)
            finally:
                self.ensemble.eval()
                for m, momentum in zip(norms, momenta):
                    m.momentum = momentum
        return [[b.clone() for b in member.buffers()] for member in self.ensemble.members]

    @contextlib.contextmanager
    def use(self, draw: int) -> Iterator[None]:
        members = self.ensemble.members
        trained = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
        try:
            with torch.no_grad():
                self._set_parameters(draw)
                if draw not in self.statistics:
                    self.statistics[draw] = self._refresh_statistics(draw)
                for member, buffers in zip(members, self.statistics[draw]):
                    for b, kept in zip(member.buffers(), buffers):
                        b.copy_(kept)
            yield
        finally:
            for member, state in zip(members, trained):
                member.load_state_dict(state)
