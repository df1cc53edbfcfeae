"""One ensemble over several processes (torch.distributed), started by torchrun or Slurm's srun.

Two strategies, both equal to one process training the same ensemble on the same global batch:
- `data`: every rank holds all M members and runs its share of each batch. Outputs and input gradients are
  all-gathered (with autograd) so a method computes its kernel over the whole batch, batch norm normalises with
  the statistics of the whole batch (all-reduced, differentiable twice), and the parameter gradients are averaged.
- `members`: the M members are split over the ranks and every rank runs the whole batch. Only the members'
  outputs and input gradients (and, for weight-space RDE, their parameter vectors) are all-gathered; each rank
  steps only its own members.

Methods see the gathered tensors through the `Ensemble` interface they use on one device (`ensemble(x)` is
`[M, B, C]`, `output_gradients` `[M, B, D]`), so no method knows it is distributed. Every rank runs the same
code, evaluation included (its work split the same way); only rank 0 writes files, logs to W&B, shows progress.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from forde.config import TrainConfig
from forde.ensemble import Ensemble, InputGradients, input_copies, running_rows
from forde.errors import ConfigError
from forde.models.derivatives import for_double_backward, native_derivatives

log = logging.getLogger(__name__)

STRATEGIES = ("data", "members")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one run."""

    rank: int
    size: int
    local_rank: int
    strategy: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(env: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK) or, under srun, as Slurm
    does for the tasks of a step (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID); None for a single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # a task of an srun step: not
        rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])  # the batch script of a job
        local = int(env.get("SLURM_LOCALID", "0"))
    else:
        return None
    return (rank, size, local) if size > 1 else None


def start(strategy: str, device: str, timeout_s: float) -> World | None:
    """Join the process group the launcher describes (None when there is none): NCCL on CUDA, gloo on the CPU.
    Collectives time out after `timeout_s`, so a rank that died ends the others with an error, never a hang."""
    ranks = ranks_from_env()
    if ranks is None:
        return None
    rank, size, local = ranks
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"{size} processes but {' and '.join(missing)} unset: launch with torchrun, or under srun export "
            "MASTER_ADDR (the first node's host name) and MASTER_PORT (a free port) before the command"
        )
    if device.startswith("cuda:"):
        raise ConfigError(
            f"device = {device!r} with {size} processes: each process takes the GPU of its local rank; set "
            "device=auto or cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"device = {device!r}: process {rank} is local rank {local}, but {torch.cuda.device_count()} GPU(s) "
                "are visible here; start at most one process per GPU, or set device=cpu"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        if rank == 0:
            log.info(
                "waiting for %d processes to join at %s:%s (run.collective_timeout_s=%g)",
                size,
                os.environ["MASTER_ADDR"],
                os.environ["MASTER_PORT"],
                timeout_s,
            )
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return World(rank, size, local, strategy)


PEER_ERRORS = ("gloo", "nccl", "processgroup", "c10d")  # what torch.distributed's backends put in their errors


def lost_peer(err: BaseException) -> str | None:
    """One line for a collective that failed because another process of the run died or hung; None for any other
    error. Each process keeps what was finished (rank 0's checkpoint), so the same launch continues from there."""
    text = str(err).strip()
    is_peer = isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(m in text.lower() for m in PEER_ERRORS)
    )
    if not is_peer:
        return None
    ranks = ranks_from_env()
    who = f"process {ranks[0]}: " if ranks else ""
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(err).__name__)  # gloo's [file:line]
    first = first.split(". ")[0][:160]
    return (
        f"{who}another process of this run stopped, stopped answering or never joined ({first}); its own error "
        "is in its output; finished epochs are kept (rank 0's checkpoint), and the same launch command continues"
    )


def free_port() -> int:
    """A TCP port free on this machine now, for a rendezvous of processes started here (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def split_sizes(n: int, parts: int) -> list[int]:
    """How n items are shared over `parts` ranks: as evenly as possible, the first ranks one more."""
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


class _AllReduce(torch.autograd.Function):
    """The sum over the ranks, differentiable any number of times: its backward is itself (every rank's loss
    depends on every rank's input), so the input-gradient terms' second derivatives pass through it."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduce.apply(grad)


def differentiable_all_reduce(t: torch.Tensor) -> torch.Tensor:
    return _AllReduce.apply(t)


class _Gather(torch.autograd.Function):
    """Every rank's piece concatenated along `dim` (pieces may differ in length by one). Backward: this rank's
    slice of the incoming gradient, summed over the ranks first when `sum_backward` (data parallelism: every rank
    computed the same loss from the gathered tensor, and the parameter gradients are averaged afterwards)."""

    @staticmethod
    def forward(ctx, piece: torch.Tensor, dim: int, sizes: list[int], rank: int, sum_backward: bool):
        ctx.dim, ctx.sizes, ctx.rank, ctx.sum_backward = dim, sizes, rank, sum_backward
        longest = max(sizes)
        padded = piece
        if piece.shape[dim] < longest:
            pad_shape = list(piece.shape)
            pad_shape[dim] = longest - piece.shape[dim]
            padded = torch.cat([piece, piece.new_zeros(pad_shape)], dim)
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.sum_backward:
            grad = differentiable_all_reduce(grad.contiguous())
        start = sum(ctx.sizes[: ctx.rank])
        return grad.narrow(ctx.dim, start, ctx.sizes[ctx.rank]), None, None, None, None


def gather(piece: torch.Tensor, dim: int, sizes: list[int], rank: int, sum_backward: bool) -> torch.Tensor:
    return _Gather.apply(piece, dim, sizes, rank, sum_backward)


class _SyncBatchNorm(TorchFunctionMode):
    """Training-mode F.batch_norm with the statistics of the whole global batch (`synced_batch_norm`: every rank's
    statistics gathered with autograd, twice differentiable for the input-gradient terms); running statistics
    updated as one process with the whole batch would (unbiased variance). Evaluation mode passes through."""

    def __init__(self, world: World):
        super().__init__()
        self.world = world

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        a = {**dict(zip(names, args)), **kwargs}
        if not a.get("training", False):
            return func(*args, **kwargs)
        return synced_batch_norm(
            a["input"],
            a.get("running_mean"),
            a.get("running_var"),
            a.get("weight"),
            a.get("bias"),
            a.get("momentum", 0.1),
            a.get("eps", 1e-5),
            self.world,
        )


def synced_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, world: World) -> torch.Tensor:
    """Each rank's per-channel count, mean and sum of squared deviations gathered in one exchange and pooled
    (Chan et al.'s parallel variance: exact, and stable where a mean is large against its spread)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    n = x.new_full((x.shape[1],), x.numel() // x.shape[1])
    local_mean = x.mean(dims) if x.numel() else torch.zeros_like(n)
    local_m2 = (x - local_mean.view(shape)).square().sum(dims)
    pieces = gather(torch.stack([n, local_mean, local_m2]).unsqueeze(0), 0, [1] * world.size, world.rank, True)
    counts, means, m2s = pieces.unbind(1)  # [P, C] each
    count = counts.sum(0).detach()
    mean = (counts * means).sum(0) / count
    var = (m2s + counts * (means - mean).square()).sum(0) / count
    centred = x - mean.view(shape)
    out = centred * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            m = 0.1 if momentum is None else momentum
            running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            running_var.mul_(1 - m).add_(var.detach() * count / (count - 1), alpha=m)
    return out


class DataParallelEnsemble(Ensemble):
    """All M members on every rank; each call runs this rank's share of the batch and returns the whole batch's
    outputs (and input gradients), batch norm synchronised. PyTorch's own derivatives are used (the hand-written
    batch-norm derivatives know nothing of the other ranks)."""

    def __init__(self, ensemble: Ensemble, world: World):
        super().__init__(list(ensemble.members), "loop")
        self.world = world

    def _shard(self, x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, list[int]]:
        sizes = split_sizes(x.shape[dim], self.world.size)
        return x.narrow(dim, sum(sizes[: self.world.rank]), sizes[self.world.rank]), sizes

    def _run(self, fn: Callable[[], torch.Tensor], sizes: list[int]) -> torch.Tensor:
        rows = running_rows(sum(sizes[: self.world.rank]), sum(sizes))
        with native_derivatives(), rows, _SyncBatchNorm(self.world) if self.training else contextlib.nullcontext():
            return fn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local, sizes = self._shard(x)
        out = self._run(lambda: Ensemble.forward(self, local), sizes)
        return gather(out, 1, sizes, self.world.rank, sum_backward=True)

    def forward_each(self, xs: torch.Tensor) -> torch.Tensor:
        local, sizes = self._shard(xs, 1)
        out = self._run(lambda: Ensemble.forward_each(self, local), sizes)
        return gather(out, 1, sizes, self.world.rank, sum_backward=True)

    def gather_examples(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        return gather(t, 1, split_sizes(batch, self.world.size), self.world.rank, sum_backward=True)

    def output_gradients(self, x, pick, create_graph: bool = True) -> InputGradients:
        local, sizes = self._shard(x)
        rank = self.world.rank
        xs = input_copies(local, len(self))
        outputs = self._run(lambda: Ensemble.forward_each(self, xs), sizes)
        # the picked outputs of the whole batch (pick knows the global targets); only this rank's reach its inputs
        picked = pick(gather(outputs, 1, sizes, rank, sum_backward=False)).sum()
        with native_derivatives():
            (grads,) = torch.autograd.grad(picked, xs, create_graph=create_graph)
        return InputGradients(
            gather(outputs, 1, sizes, rank, sum_backward=True),
            gather(grads.flatten(2), 1, sizes, rank, sum_backward=True),
        )

    def reduce_gradients(self) -> None:
        """Average the parameter gradients over the ranks."""
        all_reduce_gradients(list(self.parameters()), average=True)


def all_reduce_gradients(params: list[torch.nn.Parameter], average: bool) -> None:
    """Sum (or average) the parameters' gradients over the ranks, in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if average:
        flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class MemberParallelEnsemble(Ensemble):
    """This rank's share of the M members; every call runs the whole batch through them and returns all M
    members' outputs (input gradients), gathered with autograd. Each rank's loss is the same number; its backward
    reaches only its own members, which only it steps."""

    def __init__(self, ensemble: Ensemble, world: World):
        sizes = split_sizes(len(ensemble), world.size)
        start = sum(sizes[: world.rank])
        super().__init__(list(ensemble.members)[start : start + sizes[world.rank]], ensemble.execution)
        self.world, self.sizes, self.first_member = world, sizes, start
        self.replicated: list[torch.nn.Parameter] = []  # parameters every rank holds a copy of (`replicate`)

    def __len__(self) -> int:
        return sum(self.sizes)

    def gather_members(self, t: torch.Tensor) -> torch.Tensor:
        return gather(t, 0, self.sizes, self.world.rank, sum_backward=False)

    def gather_examples(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        return self.gather_members(t)  # every rank ran the whole batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather_members(Ensemble.forward(self, x))

    def forward_each(self, xs: torch.Tensor) -> torch.Tensor:
        return self.gather_members(
            Ensemble.forward_each(self, xs[self.first_member : self.first_member + len(self.members)])
        )

    def output_gradients(self, x, pick, create_graph: bool = True) -> InputGradients:
        if create_graph:
            self._refuse_compiled_members()
        xs = input_copies(x, len(self.members))
        with for_double_backward() if create_graph else native_derivatives():
            outputs = Ensemble.forward_each(self, xs)
        everyone = self.gather_members(outputs)
        (grads,) = torch.autograd.grad(pick(everyone).sum(), xs, create_graph=create_graph)
        return InputGradients(everyone, self.gather_members(grads.flatten(2)))

    def replicate(self, params: list[torch.nn.Parameter]) -> None:
        """Rank 0's values on every rank, and from now on the gradients summed over the ranks (each rank's backward
        holds its own members' share): a layer the members share stays one layer (Feature-RDE's classifier)."""
        for p in params:
            with torch.no_grad():
                dist.broadcast(p.data, src=0)
        self.replicated = [*self.replicated, *params]

    def reduce_gradients(self) -> None:
        all_reduce_gradients(self.replicated, average=False)

    # -- checkpoints: the whole ensemble's state, as one process writes it ----------------------------------------
    def layouts(self, optimizer: torch.optim.Optimizer) -> list[Layout]:
        """Every rank's optimizer layout (which entries are shared layers); a collective, once per optimizer."""
        replicated = {id(p): k for k, p in enumerate(self.replicated)}
        mine = [[replicated.get(id(p)) for p in group["params"]] for group in optimizer.param_groups]
        layouts: list = [None] * self.world.size
        dist.all_gather_object(layouts, mine)
        return layouts

    def full_states(self, ensemble_state: dict, optimizer_state: dict, layouts: list[Layout]) -> tuple[dict, dict]:
        """This rank's ensemble and SGD states merged with every other rank's into the one-process format
        (members and optimizer entries renumbered); every rank takes part, every rank gets the result."""
        pieces: list = [None] * self.world.size
        mine = (self.first_member, _on_cpu(ensemble_state), _on_cpu(optimizer_state))
        dist.all_gather_object(pieces, mine)  # on the CPU: a GPU tensor would arrive on its sender's device
        numbering = one_process_numbering(layouts)
        ensemble, state = {}, {}
        params: list[list[int]] = [[] for _ in optimizer_state["param_groups"]]
        for (start, ens, opt), per_group in zip(pieces, numbering):
            ensemble.update({_renumber(k, start): v for k, v in ens.items()})
            for g, entries in enumerate(per_group):
                for i, (index, own) in entries.items():
                    if own:  # a shared layer's entry is rank 0's
                        params[g].append(index)
                        if i in opt["state"]:
                            state[index] = opt["state"][i]
        groups = [{**group, "params": p} for group, p in zip(optimizer_state["param_groups"], params)]
        return ensemble, {"state": state, "param_groups": groups}

    def local_states(self, ensemble_state: dict, optimizer_state: dict, layouts: list[Layout]) -> tuple[dict, dict]:
        """This rank's share of a whole ensemble's checkpoint (written by one process or by any world size)."""
        stop = self.first_member + len(self.members)
        ensemble = {}
        for k, v in ensemble_state.items():
            index = _member_index(k)
            if index is None or self.first_member <= index < stop:
                ensemble[_renumber(k, -self.first_member) if index is not None else k] = v
        mine = one_process_numbering(layouts)[self.world.rank]
        full = {int(i): v for i, v in optimizer_state["state"].items()}
        state = {i: full[index] for entries in mine for i, (index, _) in entries.items() if index in full}
        groups = [{**group, "params": sorted(entries)} for group, entries in zip(optimizer_state["param_groups"], mine)]
        return ensemble, {"state": state, "param_groups": groups}


Layout = list[list[int | None]]  # per optimizer group, per parameter: None, or k for the k-th replicated one


def one_process_numbering(layouts: list[Layout]) -> list[list[dict[int, tuple[int, bool]]]]:
    """For each rank and group, its optimizer's indices -> (index in the one-process optimizer, whether the entry
    is its own). One process numbers the groups in order and, within one, the members in order, as the ranks hold
    them; a replicated parameter counts once, where rank 0 (which holds member 0, whose layer it is) has it."""
    numbering: list[list[dict[int, tuple[int, bool]]]] = [[{} for _ in layouts[0]] for _ in layouts]
    shared: dict[int, int] = {}
    local = [0] * len(layouts)  # each rank's next optimizer index (numbered across its groups)
    index = 0
    for g in range(len(layouts[0])):
        for rank, layout in enumerate(layouts):
            for k in layout[g]:
                if rank > 0 and k is not None:
                    numbering[rank][g][local[rank]] = (shared[k], False)
                else:
                    if k is not None:
                        shared[k] = index
                    numbering[rank][g][local[rank]] = (index, True)
                    index += 1
                local[rank] += 1
    return numbering


PER_MEMBER = ("members", "swag", "node_bnn")  # the ensemble's per-member lists: networks, SWAG moments, node noise


def _member_index(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[1]) if parts[0] in PER_MEMBER and len(parts) > 1 and parts[1].isdigit() else None


def _renumber(key: str, shift: int) -> str:
    index = _member_index(key)
    if index is None:
        return key
    group, _, rest = key.split(".", 2)
    return f"{group}.{index + shift}.{rest}"


def _on_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_on_cpu(v) for v in state]
    return state


def check_config(cfg: TrainConfig, world: World) -> None:
    """One line, before any data is read, for a run these processes cannot train as asked."""
    where = f"{world.size} processes (run.distributed={world.strategy})"
    if world.strategy == "members" and cfg.ensemble_size % world.size:
        raise ConfigError(
            f"ensemble_size = {cfg.ensemble_size} does not split evenly over {where}; launch a number of processes "
            f"that divides {cfg.ensemble_size}, or set run.distributed=data"
        )
    if world.strategy == "data" and cfg.model.execution == "vmap":
        raise ConfigError(
            f"model.execution = 'vmap' with {where}: batch norm is synchronised over the processes in the members' "
            "loop; set model.execution=auto"
        )
    if cfg.cuda.graphs:
        raise ConfigError(
            f"cuda.graphs = true with {where}: steps with collectives are not captured; set cuda.graphs=false"
        )


def distribute(ensemble: Ensemble, world: World | None) -> Ensemble:
    """The ensemble as this rank runs it: unchanged for one process."""
    if world is None:
        return ensemble
    if world.strategy == "members":
        return MemberParallelEnsemble(ensemble, world)
    return DataParallelEnsemble(ensemble, world)


def broadcast(obj, world: World | None):
    """Rank 0's `obj` on every rank (e.g. a checkpoint rank 0 read, or whether the run is already finished)."""
    if world is None:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World | None) -> None:
    if world is not None:
        dist.barrier()


@contextlib.contextmanager
def main_first(world: World | None):
    """Rank 0 runs the block first (it may write a cache: the PCA, converted data), the others after it."""
    if world is not None and not world.is_main:
        dist.barrier()
    yield
    if world is not None and world.is_main:
        dist.barrier()
