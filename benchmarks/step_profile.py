"""Where a training step's time goes: FLOPs and profiler time of DE and FoRDE steps, by kind of operation.

    python benchmarks/step_profile.py                      # small ResNet, M = 1, batch 128
    python benchmarks/step_profile.py --width 64 --device cuda

FLOPs come from torch.utils.flop_counter (convolutions and matrix products, forward and backward); times
from torch.profiler, summed by kind over operators, each counted under its nearest enclosing operator or autograd
node that has a kind, and the median over `--rounds` profiled steps per method taken in alternation. Writes
benchmarks/results/step_profile-<device>.md.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from report import write_report
from step_time import make_step, synthetic_batch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from forde.config import MethodConfig, ModelConfig
from forde.device import DeviceSettings
from forde.ensemble import build_ensemble
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE

KINDS = {"convolution": ("convolution",), "batch norm": ("batchnorm",), "matrix product": ("aten::mm", "aten::addmm")}


def kind(event) -> str:
    """The kind of the nearest enclosing operator or autograd node that has one, e.g. the multiplications
    inside NativeBatchNormBackwardBackward0 count as batch norm."""
    while event is not None:
        name = event.name.lower().replace("_", "")
        found = next((k for k, keys in KINDS.items() if any(key in name for key in keys)), None)
        if found:
            return found
        event = event.cpu_parent
    return "other"


def step_flops(step) -> dict[str, float]:
    """FLOPs of one step: convolutions (forward and every backward) and the rest."""
    with FlopCounterMode(display=False) as counter:
        step()
    flops = defaultdict(float)
    for op, n in counter.get_flop_counts()["Global"].items():
        flops["convolution" if "convolution" in str(op) else "other"] += n
    return dict(flops)


def step_ms(step, device: torch.device) -> dict[str, float]:
    """Milliseconds of one step by kind of operation (self times: nothing counted twice)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    ms = defaultdict(float)
    for event in prof.events():
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        ms[kind(event)] += own / 1e3
    ms["total"] = sum(ms.values())
    return dict(ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=16, help="ResNet18 width: 16 = small ResNet, 64 = ResNet18")
    p.add_argument("--members", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="profiled steps per method, taken in alternation; medians")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    x, y, proj = synthetic_batch(args.batch, 100, device)
    cfg = MethodConfig(name="forde", alpha=0.5)
    if args.members == 1:
        cfg.bandwidth = 1.0  # one member has no median bandwidth
    runs = {"DE": (DeepEnsemble(), "auto"), "FoRDE": (FoRDE(cfg, proj), "auto")}
    runs["FoRDE, PyTorch's second derivatives"] = (runs["FoRDE"][0], "native")
    settings = DeviceSettings(device, "fp32", channels_last=False, execution="loop")
    steps, flop_counts, times = {}, {}, defaultdict(list)
    for name, (method, bn) in runs.items():
        ens = build_ensemble(ModelConfig(name="resnet18", width=args.width), args.members, (3, 32, 32), 100, seed=0)
        ens = ens.to(device).train()
        opt = torch.optim.SGD(ens.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
        steps[name] = make_step(method, ens, x, y, opt, settings, 1, bn)
        steps[name]()  # warm-up
        flop_counts[name] = step_flops(steps[name])
    for _ in range(args.rounds):  # alternate, so that drift in the machine's speed hits every method alike
        for name, step in steps.items():
            times[name].append(step_ms(step, device))
            print(f"{name}: {times[name][-1]['total']:.0f} ms", flush=True)

    def median(values):
        return sorted(values)[len(values) // 2]

    results = {
        name: (flop_counts[name], {k: median([t.get(k, 0.0) for t in runs_ms]) for k in [*KINDS, "other", "total"]})
        for name, runs_ms in times.items()
    }
    de_flops, de_ms = results["DE"]
    kinds = [*KINDS, "other"]
    lines = [
        f"ResNet18 width {args.width}, M = {args.members}, batch {args.batch}, CIFAR-100 shapes; median of "
        f"{args.rounds} profiled steps per method, taken in alternation.",
        "",
        "| step | convolution GFLOP | convolution FLOPs / DE | other GFLOP | "
        + " | ".join(f"{k} (ms)" for k in kinds)
        + " | total (ms) | time / DE |",
        "|---|" + "---:|" * (len(kinds) + 5),
    ]
    for name, (flops, ms) in results.items():
        total = ms["total"]
        lines.append(
            f"| {name} | {flops['convolution'] / 1e9:.1f} | {flops['convolution'] / de_flops['convolution']:.2f} | "
            f"{flops.get('other', 0.0) / 1e9:.1f} | "
            + " | ".join(f"{ms.get(k, 0.0):.0f}" for k in kinds)
            + f" | {total:.0f} | {total / de_ms['total']:.2f} |"
        )
    conv = {n: ms.get("convolution", 0.0) for n, (_, ms) in results.items()}
    lines += ["", "Convolution time / DE's: " + ", ".join(f"{n} {t / conv['DE']:.2f}" for n, t in conv.items())]
    out = args.out or Path(__file__).parent / "results" / f"step_profile-{device.type}.md"
    write_report(out, f"Where a step's time goes, {device.type}", lines)


if __name__ == "__main__":
    main()
