"""Training-step time of DE and FoRDE: same data, same members, same harness, under chosen device settings.

    python benchmarks/step_time.py                       # CPU: small ResNet, M in {1, 4, 10}, batch 128
    python benchmarks/step_time.py --sizes 4 --variants de,de:derivatives=hand,forde,forde:derivatives=native
    python benchmarks/step_time.py --device cuda --models resnet18 --sizes 10 \\
        --settings loop+fp32,loop+tf32,loop+bf16+cl,vmap+bf16+cl,loop+bf16+cl+graphs

A setting joins tokens with '+': `loop` | `vmap` (model.execution), `fp32` | `tf32` | `bf16` (precision; on CUDA
fp32 is IEEE float32 convolutions, tf32 lets cuDNN use TF32, bf16 is autocast with TF32 convolutions), `cl`
(channels_last), `graphs` (cuda.graphs), `nobench` (cudnn.benchmark off; on by default on CUDA). A variant is a
method with options: `de`, `forde`, `forde:repulsion_every=2`, `forde:repulsion_subset=0.25`, `rde_feature`,
`node_bnn` (SWAG's step is DE's), and
`derivatives=native` / `derivatives=hand` to force PyTorch's or the hand-written second derivatives of batch norm
and convolution (by default only passes that are differentiated twice record the hand-written ones).

Prints a table (median step time, images/s, FoRDE / DE in the same setting and FoRDE / the fastest DE step of
the whole table, the memory a step needs) and writes it, with the machine, torch version, date and command, to
benchmarks/results/step_time-<device>.md. The variants of one setting are timed in alternation so that load
from other processes hits them alike; on shared CPUs trust the ratios more than the absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from report import write_report
from torch.utils import benchmark

from forde.config import MethodConfig, ModelConfig
from forde.device import DeviceSettings
from forde.ensemble import build_ensemble
from forde.kernels import projection
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE
from forde.methods.node_bnn import NodeBNN
from forde.methods.rde_feature import FeatureRDE
from forde.models.derivatives import hand_written_derivatives, native_derivatives
from forde.step import GRAPH_WARMUP_STEPS
from forde.step import make_step as make_train_step

MODELS = {"resnet18": ModelConfig(name="resnet18", width=64), "small_resnet": ModelConfig(name="resnet18", width=16)}
DERIVATIVES = {"auto": contextlib.nullcontext, "native": native_derivatives, "hand": hand_written_derivatives}


def parse_setting(text: str, device: torch.device) -> DeviceSettings:
    tokens = set(text.split("+"))
    known = {"loop", "vmap", "fp32", "tf32", "bf16", "cl", "graphs", "nobench"}
    if tokens - known or len(tokens & {"loop", "vmap"}) > 1 or len(tokens & {"fp32", "tf32", "bf16"}) > 1:
        raise SystemExit(
            f"bad setting {text!r}: join one of loop|vmap, one of fp32|tf32|bf16, and cl, graphs, nobench with '+'"
        )
    cuda = device.type == "cuda"
    if not cuda and tokens & {"tf32", "bf16", "graphs"}:
        raise SystemExit(f"setting {text!r}: tf32, bf16 and graphs need a CUDA device")
    return DeviceSettings(
        device,
        "bf16" if "bf16" in tokens else "fp32",
        "cl" in tokens,
        "vmap" if "vmap" in tokens else "loop",
        tf32=cuda and bool(tokens & {"tf32", "bf16"}),
        cudnn_benchmark=cuda and "nobench" not in tokens,
        graphs="graphs" in tokens,
    )


def setting_overrides(text: str) -> list[str]:
    """The config overrides that give a run the setting `text` (what `parse_setting` builds)."""
    tokens = set(text.split("+"))
    return [
        f"model.execution={'vmap' if 'vmap' in tokens else 'loop'}",
        f"precision={'bf16' if 'bf16' in tokens else 'fp32'}",
        f"cuda.tf32={str(bool(tokens & {'tf32', 'bf16'})).lower()}",
        f"channels_last={str('cl' in tokens).lower()}",
        f"cuda.graphs={str('graphs' in tokens).lower()}",
        f"cuda.cudnn_benchmark={str('nobench' not in tokens).lower()}",
    ]


def fastest_setting(table_file: Path, variant: str = "forde") -> str:
    """The setting of the fastest `variant` step in a table this script wrote."""
    rows = [
        [c.strip() for c in line.strip("|\n ").split("|")]
        for line in table_file.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| model")
    ]
    timed = [(float(r[5]), r[3]) for r in rows if r[4] == variant and r[5]]
    if not timed:
        raise SystemExit(f"{table_file} has no {variant} rows")
    return min(timed)[1]


def setting_name(s: DeviceSettings) -> str:
    parts = [s.execution, "bf16" if s.precision == "bf16" else ("tf32" if s.tf32 else "fp32")]
    parts += ["cl"] * s.channels_last + ["graphs"] * s.graphs
    parts += ["nobench"] * (s.device.type == "cuda" and not s.cudnn_benchmark)
    return "+".join(parts)


def make_step(method, ensemble, x, y, optimizer, settings: DeviceSettings, cycle: int, derivatives: str = "auto"):
    """One call = `cycle` optimizer steps of the project's training step (forde.step): a variant that repels on
    every k-th step is timed over whole k-step cycles (a median over single steps would pick one kind of step)."""
    train_step = make_train_step(method, ensemble, settings.autocast, settings.graphs)

    def step():
        for i in range(cycle):
            with DERIVATIVES[derivatives]():
                train_step(x, y, i)
            optimizer.step()

    return step


def _status_kib(field: str) -> int:
    return next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith(field + ":")
    )


def step_peak_mib(step, device: torch.device) -> float | None:
    """Memory one step needs above what was held before it (activations, autograd graph, gradients).

    CUDA: the caching allocator's peak (with CUDA graphs the captured memory pool is held before the step,
    so it is not counted here). CPU (Linux): the peak resident set, after handing freed heap back to the
    system and resetting the kernel's high-water mark; elsewhere not measured.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if device.type == "cpu" and sys.platform == "linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        step()
        return (_status_kib("VmHWM") - base) / 1024
    return None


def synthetic_batch(batch: int, classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed random CIFAR-shaped batch and a PCA-like projection: a step's cost does not depend on the values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    d = x[0].numel()
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return x, y, projection(q, torch.rand(d, generator=g) * 3, 0.5).to(device)


@dataclass
class Variant:
    name: str
    method: object
    derivatives: str
    cycle: int

    @property
    def is_de(self) -> bool:
        return self.name.split(":")[0] == "de"


def variants_of(names: list[str], m: int, proj: torch.Tensor) -> list[Variant]:
    out = []
    for name in names:
        kind, *opts = name.split(":")
        opts = dict(kv.split("=") for kv in opts)
        derivatives = opts.pop("derivatives", "auto")
        if kind == "de":
            out.append(Variant(name, DeepEnsemble(), derivatives, 1))
            continue
        cfg = MethodConfig(name=kind, alpha=0.5, **{k: type(getattr(MethodConfig, k))(v) for k, v in opts.items()})
        if kind == "rde_feature":
            out.append(Variant(name, FeatureRDE(cfg), derivatives, 1))
            continue
        if kind == "node_bnn":
            out.append(Variant(name, NodeBNN(cfg, train_size=50_000, epochs=300, seed=0), derivatives, 1))
            continue
        if m == 1:  # one member has no median bandwidth (ln 1 = 0): time it with a fixed bandwidth
            cfg.bandwidth = 1.0
        out.append(Variant(name, FoRDE(cfg, proj), derivatives, cfg.repulsion_every))
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(
    model: str,
    m: int,
    batch: int,
    classes: int,
    settings: DeviceSettings,
    variants: list[str],
    min_run_time: float,
    rounds: int,
    clock: str = "wall",
) -> list[dict]:
    device = settings.device
    settings.apply()
    x, y, proj = synthetic_batch(batch, classes, device)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    steps, peaks, cycles = {}, {}, {}
    for v in variants_of(variants, m, proj):
        ens = build_ensemble(MODELS[model], m, (3, 32, 32), classes, seed=0).to(device).train()
        ens.execution = settings.execution
        if settings.channels_last:
            ens = ens.to(memory_format=torch.channels_last)
        if hasattr(v.method, "attach"):  # shares a layer or adds parameters, as a run does before its optimizer
            v.method.attach(ens)
        opt = torch.optim.SGD(ens.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
        cycles[v.name] = v.cycle
        steps[v.name] = make_step(v.method, ens, x, y, opt, settings, v.cycle, v.derivatives)
        warmup = GRAPH_WARMUP_STEPS + 2 if settings.graphs else (3 if device.type == "cuda" else 1)
        for _ in range(warmup):  # allocator, kernels, cuDNN autotuning, graph capture
            steps[v.name]()
        peaks[v.name] = step_peak_mib(steps[v.name], device)
    times = {n: [] for n in steps}
    for _ in range(rounds):  # alternate: DE, FoRDE, DE, FoRDE, ...
        for name, step in steps.items():
            timer = benchmark.Timer("step()", globals={"step": step}, timer=CLOCKS[clock])
            t = timer.blocked_autorange(min_run_time=min_run_time)
            times[name].append(t.median / cycles[name])
    med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    de = med.get("de")
    return [
        {
            "model": model,
            "M": m,
            "batch": batch,
            "setting": setting_name(settings),
            "variant": n,
            "step_s": t,
            "img_s": batch / t,
            "vs_de": t / de if de else None,
            "peak_mib": peaks[n],
        }
        for n, t in med.items()
    ]


def add_fastest_de_ratio(rows: list[dict]) -> None:
    """FoRDE / the fastest DE step measured for the same network and M, over every setting and DE variant."""
    timed = [r for r in rows if "error" not in r]
    for r in timed:
        de = [
            o["step_s"]
            for o in timed
            if o["variant"].split(":")[0] == "de" and (o["model"], o["M"]) == (r["model"], r["M"])
        ]
        r["vs_fastest_de"] = r["step_s"] / min(de) if de else None


def table(rows: list[dict]) -> str:
    def ratio(v):
        return f"{v:.2f}" if v is not None else ""

    lines = [
        "| model | M | batch | setting | variant | step (ms) | img/s | / DE, same setting | / fastest DE | step peak MiB |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['M']} | {r['batch']} | {r['setting']} | failed: {r['error']} | | | | | |"
            )
            continue
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['M']} | {r['batch']} | {r['setting']} | {r['variant']} | {1e3 * r['step_s']:.1f} | "
            f"{r['img_s']:.0f} | {ratio(r['vs_de'])} | {ratio(r.get('vs_fastest_de'))} | {peak} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="small_resnet")
    p.add_argument("--sizes", default="1,4,10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=100, help="100 = CIFAR-100 shapes")
    p.add_argument(
        "--settings", default="loop+fp32", help="comma-separated device settings, e.g. loop+fp32,vmap+bf16+cl"
    )
    p.add_argument(
        "--variants",
        default="de,forde",
        help="e.g. de,de:derivatives=hand,forde,forde:derivatives=native,forde:repulsion_every=2",
    )
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per timing block")
    p.add_argument("--rounds", type=int, default=3, help="timing blocks per variant, taken in alternation; medians")
    p.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time, or the CPU time of this process (all its threads): steadier on a shared CPU",
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--fastest",
        type=Path,
        default=None,
        metavar="TABLE",
        help="print the config overrides of the fastest FoRDE setting in TABLE (a file this script wrote), and exit",
    )
    args = p.parse_args()
    if args.fastest:
        print(" ".join(setting_overrides(fastest_setting(args.fastest))))
        return
    device = torch.device(args.device)
    settings = [parse_setting(s, device) for s in args.settings.split(",")]
    out = args.out or Path(__file__).parent / "results" / f"step_time-{device.type}.md"
    title = (
        f"Training step time{'' if args.clock == 'wall' else ' (CPU time of the process, all threads)'}, {device.type}"
    )
    rows = []
    for model in args.models.split(","):
        for m in map(int, args.sizes.split(",")):
            for s in settings:
                try:
                    new = measure(
                        model,
                        m,
                        args.batch,
                        args.classes,
                        s,
                        args.variants.split(","),
                        args.min_run_time,
                        args.rounds,
                        args.clock,
                    )
                except Exception as err:  # e.g. out of memory: the other settings are still measured
                    new = [
                        {
                            "model": model,
                            "M": m,
                            "batch": args.batch,
                            "setting": setting_name(s),
                            "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}",
                        }
                    ]
                rows += new
                print("\n".join(table(new).splitlines()[2:]), flush=True)
                add_fastest_de_ratio(rows)
                write_report(
                    out, title, ["", *table(rows).splitlines()], echo=False
                )  # a run stopped early keeps its rows
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    write_report(out, title, ["", *table(rows).splitlines()])


if __name__ == "__main__":
    main()
