"""Processes of a distributed test: a few float64 training steps of a small convolutional ensemble with batch norm,
on one process (the reference) or as one rank of several (gloo). Spawned by tests/test_distributed.py."""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from forde import distributed
from forde.config import MethodConfig, OptimConfig
from forde.ensemble import Ensemble
from forde.methods import LIT, DeepEnsemble, FeatureRDE, FoRDE, FunctionRDE, NodeBNN, WeightRDE

MEMBERS, BATCH, STEPS, CLASSES, SHAPE = 4, 10, 3, 3, (2, 5, 5)  # 10 samples: 2 ranks get 5 each (odd shares)


def member() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(SHAPE[0], 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),  # smooth: input gradients differ between members in every entry
        nn.Flatten(),
        nn.Linear(4 * SHAPE[1] * SHAPE[2], CLASSES),
    )


def method(name: str):
    base = MethodConfig(name=name)  # type: ignore[arg-type]
    if name == "forde_per_column":
        generator = torch.Generator().manual_seed(7)
        d = SHAPE[0] * SHAPE[1] * SHAPE[2]
        projection = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]
        return FoRDE(replace(base, name="forde", median="per_column"), projection * torch.rand(d, generator=generator))
    if name == "forde_all_pairs":
        return FoRDE(replace(base, name="forde", median="all_pairs"), None)
    if name == "forde_subset":
        return FoRDE(replace(base, name="forde", repulsion_subset=0.6), None)
    if name == "de":
        return DeepEnsemble()
    if name == "node_bnn":  # 3 epochs of one step: the KL term's weight 0, 1/2, 1
        return NodeBNN(base, train_size=BATCH * STEPS, epochs=STEPS, seed=5)
    if name == "rde_feature":
        return FeatureRDE(base)
    return {"lit": LIT, "rde_weight": WeightRDE, "rde_function": FunctionRDE}[name](base)


def batches(steps: int):
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        yield (
            torch.randn(BATCH, *SHAPE, generator=generator, dtype=torch.float64),
            torch.randint(0, CLASSES, (BATCH,), generator=generator),
        )


def train_steps(name: str, world: distributed.World | None = None, steps: int = STEPS) -> dict:
    """Parameters, buffers (batch-norm statistics) and losses after `steps` SGD steps with momentum: the whole
    ensemble's, in the one-process numbering, on every rank."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _train_steps(name, world, steps)
    finally:
        torch.set_default_dtype(saved)


def _train_steps(name: str, world: distributed.World | None, steps: int) -> dict:
    torch.manual_seed(0)
    full = Ensemble([member() for _ in range(MEMBERS)])
    ensemble = distributed.distribute(full, world)
    m = method(name)
    if hasattr(m, "attach"):
        m.attach(ensemble)
    groups = m.param_groups(ensemble, OptimConfig()) if hasattr(m, "param_groups") else ensemble.parameters()
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    losses = []
    for step, (x, y) in enumerate(batches(steps)):
        out = m.loss(ensemble, x, y, step=step, epoch=step)
        optimizer.zero_grad()
        out.loss.backward()
        ensemble.reduce_gradients()
        optimizer.step()
        losses.append(out.loss.item())
    state, opt = ensemble.state_dict(), optimizer.state_dict()
    if isinstance(ensemble, distributed.MemberParallelEnsemble):
        state, opt = ensemble.full_states(state, opt, ensemble.layouts(optimizer))
    momentum = [opt["state"][i]["momentum_buffer"].clone() for i in sorted(opt["state"])]
    return {"state": {k: v.clone() for k, v in state.items()}, "losses": losses, "momentum": momentum}


def rank_main(rank: int, size: int, port: int, names: list[str], strategy: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    world = distributed.start(strategy, "cpu", timeout_s=60)
    try:
        torch.save({n: train_steps(n, world) for n in names}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.stop()
