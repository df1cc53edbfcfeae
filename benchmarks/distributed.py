"""Training-step time of one FoRDE ensemble over several processes, and the share of a step spent exchanging.

    python benchmarks/distributed.py                          # CPU: 1 and 2 processes (gloo), M = 4, batch 128
    python benchmarks/distributed.py --device cuda --processes 1,2 --model resnet18   # GPUs: NCCL, one per process

Each setting starts its processes afresh (torch.multiprocessing, the same rendezvous torchrun uses) and times
`--steps` training steps after warm-up: the median step on rank 0, and the time every collective of the step took
(all-gathers of outputs and input gradients, batch norm's all-reduces, the gradient all-reduce; waiting for the
slowest rank included) as a share of the step. One process is the plain one-device step (the reference). On a CPU
the processes share its cores (each gets cores / processes threads), so speed-up is not expected there; the
exchange's share is what the CPU measures. Writes benchmarks/results/distributed-<device>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from report import write_report
from step_time import MODELS, synthetic_batch

from forde import distributed
from forde.config import MethodConfig
from forde.ensemble import build_ensemble
from forde.methods.forde import FoRDE

COLLECTIVES = ("all_gather", "all_reduce")


def timed_collectives(spent: list[float]) -> None:
    """Wrap torch.distributed's collectives (which forde.distributed and torch.distributed.nn call through the
    module) so each call adds its wall time, synchronised on CUDA, to `spent`."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def timed(*args, _original=original, **kwargs):
            start = time.perf_counter()
            out = _original(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            spent.append(time.perf_counter() - start)
            return out

        setattr(dist, name, timed)


def rank_main(rank: int, size: int, port: int, args: argparse.Namespace, queue) -> None:
    cuda = args.device == "cuda"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size) if not cuda else 1)
    world = None
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
        os.environ["LOCAL_RANK"] = str(rank)
        world = distributed.start(args.strategy, args.device, timeout_s=600)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    x, y, proj = synthetic_batch(args.batch, 10, device)
    full = build_ensemble(MODELS[args.model], args.members, (3, 32, 32), 10, seed=0)
    ensemble = distributed.distribute(full, world).to(device).train()
    method = FoRDE(MethodConfig(name="forde"), proj)
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=1e-3, momentum=0.9)
    spent: list[float] = []
    timed_collectives(spent)
    steps, shares = [], []
    for i in range(args.warmup + args.steps):
        spent.clear()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = method.loss(ensemble, x, y)
        optimizer.zero_grad()
        out.loss.backward()
        ensemble.reduce_gradients()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            steps.append(elapsed)
            shares.append(sum(spent) / elapsed)
    if rank == 0:
        queue.put((statistics.median(steps), statistics.median(shares), len(spent)))
    if world is not None:
        distributed.stop()


def measure(size: int, args: argparse.Namespace) -> tuple[float, float, int]:
    port = distributed.free_port()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(rank_main, args=(size, port, args, queue), nprocs=size, start_method="spawn")
    return queue.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--processes", default="1,2", help="comma-separated process counts (1 = the one-device step)")
    p.add_argument("--strategies", default="members,data")
    p.add_argument("--model", default="small_resnet", choices=sorted(MODELS))
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.device == "cuda" and max(int(n) for n in args.processes.split(",")) > torch.cuda.device_count():
        raise SystemExit(f"--processes {args.processes}: this machine has {torch.cuda.device_count()} GPU(s)")
    rows = []
    one = None
    for size in (int(n) for n in args.processes.split(",")):
        for strategy in args.strategies.split(",") if size > 1 else ["one device"]:
            args.strategy = strategy
            step, share, calls = measure(size, args)
            one = step if size == 1 else one
            speedup = f"{one / step:.2f}" if one else "-"
            rows.append(f"| {size} | {strategy} | {step * 1000:,.0f} | {speedup} | {share:.1%} | {calls} |")
            print(rows[-1], flush=True)
    body = [
        f"FoRDE training step, {args.model}, M = {args.members}, batch {args.batch}, CIFAR shapes, {args.device}; "
        f"median of {args.steps} steps after {args.warmup} warm-up; rank 0's clock.",
        "",
        "| processes | strategy | step (ms) | speed-up vs one | share in collectives | collectives per step |",
        "|---:|---|---:|---:|---:|---:|",
        *rows,
    ]
    out = args.out or Path(__file__).parent / "results" / f"distributed-{args.device}.md"
    write_report(out, "One ensemble over several processes", body)


if __name__ == "__main__":
    sys.exit(main())
