"""Everything built from a config before the first step: the device settings, the data, the ensemble and the
method, checked in that order (the model against the data's shape before any data is read). Cheap to rebuild,
so `forde eval` builds it again from a run directory's config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from forde.config import ConfigError, TrainConfig
from forde.data.base import Dataset
from forde.data.images import available_memory, gib
from forde.data.registry import input_spec, load_dataset
from forde.device import DeviceSettings, resolve_settings
from forde.distributed import World, check_config, distribute, main_first
from forde.ensemble import Ensemble, build_ensemble
from forde.evaluate import EvalContext, eval_context
from forde.methods import Method, build_method
from forde.models import check_model


@dataclass
class Setup:
    """Everything built from a config before the first step: cheap to rebuild for `forde eval`."""

    cfg: TrainConfig
    settings: DeviceSettings
    dataset: Dataset
    ensemble: Ensemble
    method: Method
    prepare: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)
    world: World | None = None  # this process's place in a run over several processes (forde.distributed)

    @property
    def device(self) -> torch.device:
        return self.settings.device

    def autocast(self, cache_enabled: bool = True):
        return self.settings.autocast(cache_enabled)

    @property
    def eval_ctx(self) -> EvalContext:
        return eval_context(
            self.cfg.eval,
            self.dataset,
            self.device,
            self.cfg.method.grad_target,
            autocast=self.autocast,
            prepare=self.prepare,
        )


BYTES_PER_PARAMETER = 16  # float32 weights, gradients, momentum, and one copy (an optimizer step, a checkpoint)


def check_ensemble_fits(cfg: TrainConfig, parameters: int) -> None:
    """One line, before any data is read, when the members alone would not fit in this machine's memory (e.g.
    ensemble_size=100000: building them would take minutes and end in an out-of-memory kill)."""
    available = available_memory()
    need = cfg.ensemble_size * parameters * BYTES_PER_PARAMETER
    if available is not None and need > 0.9 * available:
        raise ConfigError(
            f"ensemble_size = {cfg.ensemble_size}: {cfg.ensemble_size} members of {parameters:,} parameters need "
            f"about {gib(need)} for weights, gradients and momentum, over the {gib(available)} of memory available "
            "here; lower ensemble_size or use a smaller network"
        )


def build(
    cfg: TrainConfig, dataset: Dataset | None = None, method: Method | None = None, world: World | None = None
) -> Setup:
    """`dataset` and `method` replace the configured ones (benchmarks time synthetic data). The model is checked
    against the data's shape before the data is read and the PCA computed. With `world`, the ensemble is this
    process's part of a distributed run (every process builds all members from the seed and keeps its share)."""
    if world is not None:
        check_config(cfg, world)
    settings = resolve_settings(cfg)
    settings.apply()
    device = settings.device
    if dataset is None:
        check_ensemble_fits(cfg, check_model(cfg.model, *input_spec(cfg.data), cfg.data.name))
        with main_first(world):
            dataset = load_dataset(cfg.data)
    ensemble = build_ensemble(cfg.model, cfg.ensemble_size, dataset.input_shape, dataset.num_classes, cfg.seed)
    ensemble.execution = settings.execution
    ensemble = distribute(ensemble, world).to(device)

    def prepare(x):
        return x

    if settings.channels_last and len(dataset.input_shape) == 3:
        ensemble = ensemble.to(memory_format=torch.channels_last)

        def prepare(x):
            return x.contiguous(memory_format=torch.channels_last)

    if method is None:
        with main_first(world):  # the PCA's cache is written once
            method = build_method(cfg, dataset, device)
    if hasattr(method, "attach"):  # a method that changes the members (shares a layer, adds hooks or parameters)
        method.attach(ensemble)
    return Setup(cfg, settings, dataset, ensemble, method, prepare, world)
