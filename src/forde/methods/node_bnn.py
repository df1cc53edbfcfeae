"""Node-BNNs (Trinh, Heinonen, Acerbi & Kaski, ICML 2022): point-estimated weights whose hidden units are
multiplied by latent Gaussian variables, learned by variational inference; here one node-BNN per member.

As the authors' benchmarks and code (AaltoPML/node-BNN-covariate-shift) do it:
- Noise on every unit's *output*: each `nn.Conv2d` output channel (the stem and the 1x1 shortcuts included) and
  each `nn.Linear` output (the logits of a ResNet) is multiplied by z ~ q(z); batch norm stays deterministic.
- q(z) = an equal-weight mixture of K = `node_components` diagonal Gaussians on the multipliers themselves;
  each example of a batch gets its own draw, from component (its index mod K). Prior N(1, s^2), s =
  `node_prior_std`. Means start at N(1, 0.05^2), standard deviations (softplus of a parameter) at
  |N(`node_init_std`, 0.02^2)|.
- Loss = NLL averaged over `node_train_samples` copies of each example + beta (H[q, p] - (1 + gamma) H_BD[q]) / N:
  the cross-entropy of the mixture with the prior, and the Bhattacharyya lower bound on the mixture's entropy
  (Kolchinsky & Tracey 2017), gamma = `node_gamma` (the code's default 1; the benchmark value is not stated),
  beta rising linearly from 0 to 1 over the first `node_kl_ramp` of the epochs (per epoch, 200 of 300 on CIFAR),
  N the training set's size. The weights' prior is the optimizer's weight decay; the variational parameters
  have their own SGD group: learning rate `node_lr`, constant, no momentum, no weight decay.
- Evaluation averages the probabilities of `node_test_samples` draws per component (K times as many forward
  passes); the per-epoch validation uses the multipliers' mixture mean instead (one pass).

Each member's noise comes from its own generator, seeded by (run seed, step, member) in training and (run seed,
draw, member) in evaluation, so a resumed run, a repeated evaluation and members spread over processes
(forde.distributed) draw the same noise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from forde.config import ConfigError, MethodConfig, OptimConfig
from forde.ensemble import Ensemble, batch_rows
from forde.methods.base import LossOutput
from forde.methods.likelihoods import Categorical, Likelihood
from forde.methods.swag import draw_seed

MEAN_INIT = (1.0, 0.05)  # the code's posterior_mean_init: N(1, 0.05^2)
STD_INIT_SPREAD = 0.02  # the code's posterior_std_init spread
INITIAL, TRAINING, EVALUATION = 0, 1, 2  # the noise's streams: draw_seed(run seed, step or draw, stream, member)


def noisy_layers(member: nn.Module) -> list[nn.Module]:
    return [m for m in member.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x.expm1().log()


def bhattacharyya_entropy(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Lower bound on the entropy of the equal-weight mixture of N(mean[k], diag std[k]^2), [K, D] each:
    mean_k H[q_k] - mean_i log mean_j exp(-BD(q_i, q_j))."""
    k = mean.shape[0]
    conditional = (0.5 * math.log(2 * math.pi * math.e) + std.log()).sum(1).mean()
    var_sum = std.square()[:, None, :] + std.square()[None, :, :]
    log_std = std.log().sum(1)
    distance = 0.25 * ((mean[:, None, :] - mean[None, :, :]).square() / var_sum).sum(2) + 0.5 * (
        (0.5 * var_sum).log().sum(2) - log_std[:, None] - log_std[None, :]
    )
    return conditional - (torch.logsumexp(-distance, dim=1) - math.log(k)).mean()


def prior_cross_entropy(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """H[q, p] = mean over components of sum over units of E_{q_k}[-log N(z; 1, prior_std^2)]."""
    per_unit = (
        math.log(prior_std) + 0.5 * math.log(2 * math.pi) + (std.square() + (mean - 1).square()) / (2 * prior_std**2)
    )
    return per_unit.sum(1).mean()


class MemberNoise(nn.Module):
    """One member's variational parameters, one [K, units] mean and raw-std pair per noisy layer, and the forward
    hooks that multiply the layers' outputs by the noise."""

    def __init__(self, member: nn.Module, index: int, cfg: MethodConfig, generator: torch.Generator):
        super().__init__()
        layers = noisy_layers(member)
        if not layers:
            raise ConfigError(
                f"method.name = node_bnn multiplies the outputs of nn.Conv2d and nn.Linear layers by latent noise, "
                f"and ensemble member {index} has none; use a network built from those layers"
            )
        k = cfg.node_components
        self.means, self.raw_stds = nn.ParameterList(), nn.ParameterList()
        for layer in layers:
            units = layer.out_channels if isinstance(layer, nn.Conv2d) else cast(nn.Linear, layer).out_features
            like = cast(torch.Tensor, layer.weight)
            mean = torch.empty(k, units).normal_(*MEAN_INIT, generator=generator)
            std = torch.empty(k, units).normal_(cfg.node_init_std, STD_INIT_SPREAD, generator=generator).abs()
            self.means.append(nn.Parameter(mean.to(like)))
            self.raw_stds.append(nn.Parameter(inverse_softplus(std).to(like)))
        self.components = k
        self.draw: int | None = None  # the component all examples use while an evaluation draw is active
        self.generator: torch.Generator | None = None
        for i, layer in enumerate(layers):
            layer.register_forward_hook(self._hook(i, isinstance(layer, nn.Conv2d)))

    def stds(self) -> list[torch.Tensor]:
        return [F.softplus(s) for s in self.raw_stds]

    def _hook(self, i: int, conv: bool):
        def multiply(module, inputs, out):
            return out * self.noise(i, out).view(self.shape_like(out, conv))

        return multiply

    @staticmethod
    def shape_like(out: torch.Tensor, conv: bool) -> list[int]:
        """Broadcast [B, units] against a conv output [B, C, ...] (channels at dim 1) or a linear one [B, ..., C]."""
        if conv:
            return [out.shape[0], out.shape[1]] + [1] * (out.dim() - 2)
        return [out.shape[0]] + [1] * (out.dim() - 2) + [out.shape[-1]]

    def noise(self, i: int, out: torch.Tensor) -> torch.Tensor:
        mean, std = self.means[i], F.softplus(self.raw_stds[i])
        rows = out.shape[0]
        if not self.training and self.draw is None:
            return mean.mean(0).to(out.dtype).expand(rows, -1)  # the mixture's mean multiplier
        first, batch = batch_rows(rows)  # a share of the batch: its rows of the noise the whole batch gets
        if self.draw is None:
            index = torch.arange(first, first + rows, device=out.device) % self.components
        else:
            index = torch.full((rows,), self.draw % self.components, device=out.device)
        eps = torch.randn((batch, mean.shape[1]), generator=self.generator, device=out.device, dtype=mean.dtype)
        return (mean[index] + std[index] * eps[first : first + rows]).to(out.dtype)

    def divergence(self, prior_std: float) -> tuple[torch.Tensor, torch.Tensor]:
        """sum over layers of H[q, p] and of H_BD[q]."""
        cross, entropy = [], []
        for mean, std in zip(self.means, self.stds()):
            cross.append(prior_cross_entropy(mean, std, prior_std))
            entropy.append(bhattacharyya_entropy(mean, std))
        return torch.stack(cross).sum(), torch.stack(entropy).sum()


def member_noises(ensemble: Ensemble) -> list[MemberNoise]:
    """The noise modules `NodeBNN.attach` put on the ensemble, one per member."""
    return [cast(MemberNoise, m) for m in cast(nn.ModuleList, ensemble.get_submodule("node_bnn"))]


def variational_parameters(ensemble: Ensemble) -> list[nn.Parameter]:
    return [p for noise in member_noises(ensemble) for p in noise.parameters()]


class NodeBNN:
    name = "node_bnn"

    def __init__(
        self, cfg: MethodConfig, train_size: int, epochs: int, seed: int, likelihood: Likelihood | None = None
    ):
        self.cfg, self.train_size, self.epochs, self.seed = cfg, train_size, epochs, seed
        self.likelihood = likelihood or Categorical()

    def attach(self, ensemble: Ensemble) -> None:
        """Variational parameters and noise hooks for every member, initialised from (run seed, member)."""
        noises = []
        for i, member in enumerate(ensemble.members, start=ensemble.first_member):
            generator = torch.Generator().manual_seed(draw_seed(self.seed, 0, INITIAL, i))
            noises.append(MemberNoise(member, i, self.cfg, generator))
        ensemble.node_bnn = nn.ModuleList(noises)

    def param_groups(self, ensemble: Ensemble, optim: OptimConfig) -> list[dict]:
        """The weights on the run's schedule; the variational parameters at a constant rate, no momentum or decay."""
        variational = {id(p) for p in variational_parameters(ensemble)}
        return [
            {"params": [p for p in ensemble.parameters() if id(p) not in variational]},
            {
                "params": variational_parameters(ensemble),
                "lr": self.cfg.node_lr,
                "momentum": 0.0,
                "nesterov": False,
                "weight_decay": 0.0,
                "fixed_lr": True,
            },
        ]

    def kl_weight(self, epoch: float) -> float:
        """beta: 0 in epoch 0, rising by 1 / (node_kl_ramp x epochs) per epoch to 1."""
        ramp = self.cfg.node_kl_ramp * self.epochs
        return 1.0 if ramp <= 0 else min(1.0, math.floor(epoch) / ramp)

    def loss(
        self, ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, step: int = 0, epoch: float = 0.0
    ) -> LossOutput:
        cfg, copies = self.cfg, self.cfg.node_train_samples
        with noise_draw(ensemble, self.seed, step, TRAINING):
            outputs = ensemble(x.repeat_interleave(copies, 0))  # [M, B * L, C], copies of an example side by side
        nll = self.likelihood.nll(outputs, y.repeat_interleave(copies, 0))
        divergences = [torch.stack(noise.divergence(cfg.node_prior_std)) for noise in member_noises(ensemble)]
        cross_t, entropy_t = ensemble.gather_members(torch.stack(divergences)).sum(0)  # every member's terms
        beta = self.kl_weight(epoch)
        loss = nll + beta * (cross_t - (1 + cfg.node_gamma) * entropy_t) / self.train_size
        m, c = outputs.shape[0], outputs.shape[-1]
        per_example = outputs.view(m, -1, copies, c).log_softmax(-1).logsumexp(2) - math.log(copies)
        return LossOutput(
            loss,
            per_example,
            {
                self.likelihood.name: nll.detach(),
                "kl": (cross_t - entropy_t).detach(),
                "entropy": entropy_t.detach(),
                "kl_weight": torch.tensor(beta),
            },
        )

    def sampler(self, setup) -> NodeSampler:
        return NodeSampler(setup.ensemble, self.seed, self.cfg.node_components * self.cfg.node_test_samples)


@contextlib.contextmanager
def noise_draw(ensemble: Ensemble, seed: int, draw: int, stream: int, component: int | None = None) -> Iterator[None]:
    """Within the block, each member's noise comes from its own generator for (seed, draw, stream, member); with
    `component`, every example uses that mixture component (an evaluation draw)."""
    device = next(ensemble.parameters()).device
    noises = member_noises(ensemble)
    for i, noise in enumerate(noises, start=ensemble.first_member):
        noise.generator = torch.Generator(device=device).manual_seed(draw_seed(seed, draw, stream, i))
        noise.draw = component
    try:
        yield
    finally:
        for noise in noises:
            noise.draw, noise.generator = None, None


class NodeSampler:
    """Draw s: every example from component s mod K, each member's noise from (run seed, s, member)."""

    def __init__(self, ensemble: Ensemble, seed: int, samples: int):
        self.ensemble, self.seed, self.samples = ensemble, seed, samples

    def use(self, draw: int) -> contextlib.AbstractContextManager[None]:
        return noise_draw(self.ensemble, self.seed, draw, EVALUATION, component=draw)
