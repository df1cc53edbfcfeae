"""Training steps of networks from anywhere: what the built-in networks pay for the hand-written derivatives, and what
those derivatives give a timm ResNet and a small ViT.

    python benchmarks/any_network.py                  # CPU: M = 4, batch 128, CIFAR-100 shapes, 9 rounds
    python benchmarks/any_network.py --rounds 3 --members 2 --batch 64    # a quick look

Three groups, each timed in alternating rounds (every arm of the group once per round, the order rotated from round
to round, so that load from other processes and the place in the order hit every arm alike); reported: the medians
and, for each arm against the group's first, the range of the per-round ratios, which shows the noise:
- DE steps of the ResNet18 (width 16) written from torch.nn layers in benchmarks/plain_resnet.py and built through
  `model.name=plain_resnet:PlainResNet18`, of the built-in ResNet18, and of the built-in network with the
  hand-written path forced on (what a plain step would pay if it were routed there);
- FoRDE steps of timm's ResNet18 (`timm:resnet18`, stage widths 16-128) and of the small ViT of the tests
  (`user_models.vit:TinyViT`: 4x4 patches, width 64, 4 blocks, a depthwise convolution, SDPA attention), each with
  the hand-written batch-norm and convolution derivatives (the default) and with PyTorch's.
Writes benchmarks/results/any_network-<device>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from report import write_report
from step_time import CLOCKS, make_step, synthetic_batch
from torch.utils import benchmark

from forde.config import MethodConfig, ModelConfig
from forde.device import DeviceSettings
from forde.ensemble import build_ensemble
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE
from forde.models import build_model

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # user_models: the tests' user-defined ViT

BUILTIN = ModelConfig(name="resnet18", width=16)
PLAIN = ModelConfig(name="plain_resnet:PlainResNet18", kwargs={"width": 16})
TIMM = ModelConfig(name="timm:resnet18", kwargs={"channels": [16, 32, 64, 128]})
VIT = ModelConfig(
    name="user_models.vit:TinyViT", kwargs={"in_chans": 3, "patch_size": 4, "dim": 64, "depth": 4, "heads": 4}
)
# group -> (title, [(arm, model, method, derivatives)]); each arm's ratio is to the group's first arm
GROUPS = {
    "de": (
        "DE",
        [
            ("ResNet18 written from torch.nn layers", PLAIN, "de", "auto"),
            ("built-in ResNet18", BUILTIN, "de", "auto"),
            ("built-in ResNet18, hand-written path forced", BUILTIN, "de", "hand"),
        ],
    ),
    "timm": (
        "FoRDE, timm ResNet18",
        [("hand-written derivatives", TIMM, "forde", "auto"), ("PyTorch's derivatives", TIMM, "forde", "native")],
    ),
    "vit": (
        "FoRDE, small ViT",
        [("hand-written derivatives", VIT, "forde", "auto"), ("PyTorch's derivatives", VIT, "forde", "native")],
    ),
}
SHAPE = (3, 32, 32)


def check_same_network(classes: int) -> None:
    """The torch.nn copy loads the built-in network's state dict and computes the same logits."""
    builtin, plain = build_model(BUILTIN, SHAPE, classes), build_model(PLAIN, SHAPE, classes)
    plain.load_state_dict(builtin.state_dict())
    x = torch.randn(4, *SHAPE)
    torch.testing.assert_close(plain.train()(x), builtin.train()(x))


def time_group(
    arms, members: int, x, y, proj, settings, rounds: int, min_run_time: float, clock: str
) -> dict[str, list[float]]:
    steps = {}
    for name, model, method, derivatives in arms:
        ens = build_ensemble(model, members, SHAPE, int(y.max()) + 1, seed=0).to(settings.device).train()
        opt = torch.optim.SGD(ens.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
        bandwidth = 1.0 if members == 1 else None  # one member has no median bandwidth (ln 1 = 0)
        m = DeepEnsemble() if method == "de" else FoRDE(MethodConfig(alpha=0.5, bandwidth=bandwidth), proj)
        steps[name] = make_step(m, ens, x, y, opt, settings, 1, derivatives)
        steps[name]()  # warm-up
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # each arm leads in turn
            timer = benchmark.Timer("step()", globals={"step": steps[name]}, timer=CLOCKS[clock])
            t = timer.blocked_autorange(min_run_time=min_run_time)
            times[name].append(t.median)
        print(
            f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * v[-1]:.0f} ms" for n, v in times.items()), flush=True
        )
    return times


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def table(results: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = [
        "| group | arm | median step (ms) | / first arm (ratio of medians) | per-round ratios, min-max |",
        "|---|---|---:|---:|---:|",
    ]
    for group, times in results.items():
        first = next(iter(times))
        for name, values in times.items():
            ratios = [a / b for a, b in zip(values, times[first])]
            spread = "" if name == first else f"{min(ratios):.3f}-{max(ratios):.3f}"
            ratio = "" if name == first else f"{median(values) / median(times[first]):.3f}"
            lines.append(f"| {group} | {name} | {1e3 * median(values):.0f} | {ratio} | {spread} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing block")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time, or the CPU time of this process (all its threads): steadier on a shared CPU",
    )
    p.add_argument(
        "--groups", default=",".join(GROUPS), help=f"comma-separated, of: {', '.join(GROUPS)} (default: all)"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    settings = DeviceSettings(device, "fp32", channels_last=False, execution="loop")
    settings.apply()
    check_same_network(args.classes)
    x, y, proj = synthetic_batch(args.batch, args.classes, device)
    suffix = "" if args.clock == "wall" else f"-{args.clock}time"
    out = args.out or Path(__file__).parent / "results" / f"any_network{suffix}-{device.type}.md"
    title = f"Training steps of any network, {device.type}"
    header = [
        f"M = {args.members}, batch {args.batch}, CIFAR-100 shapes, {args.rounds} rounds per group (arms "
        f"alternating within each round), {'wall time' if args.clock == 'wall' else 'CPU time of the process'}; "
        "median of each arm's rounds.",
        "",
    ]
    results = {}
    for group in args.groups.split(","):
        title_of, arms = GROUPS[group]
        results[title_of] = time_group(
            arms, args.members, x, y, proj, settings, args.rounds, args.min_run_time, args.clock
        )
        write_report(out, title, header + table(results), echo=False)  # a run stopped early keeps its groups
    write_report(out, title, header + table(results))


if __name__ == "__main__":
    main()
