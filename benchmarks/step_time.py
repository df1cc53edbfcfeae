"""Training-step time of DE and FoRDE: same data, same members, same harness.

    python benchmarks/step_time.py                       # CPU: small ResNet, M in {1, 4, 10}, batch 128
    python benchmarks/step_time.py --device cuda --models resnet18,small_resnet
    python benchmarks/step_time.py --execution loop,vmap   # members in a loop vs vectorised
    python benchmarks/step_time.py --variants forde,forde:bn=native  # batch norm's 2nd derivative: ours vs PyTorch's

Prints a table (median step time, images/s, FoRDE/DE ratio, the memory a step needs) and writes it, with the
machine, torch version, date and command, to benchmarks/results/step_time-<device>.md. DE and FoRDE
steps are timed in alternation so that load from other processes hits both alike; on shared CPUs
trust the ratio more than the absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

from report import write_report

from forde.config import MethodConfig, ModelConfig
from forde.ensemble import build_ensemble
from forde.kernels import projection
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE
from forde.models.batchnorm import native_batch_norm_derivatives

MODELS = {"resnet18": ModelConfig(name="resnet18", width=64), "small_resnet": ModelConfig(name="resnet18", width=16)}


def make_step(method, ensemble, x, y, optimizer, autocast, cycle: int, native_bn: bool):
    """One call = `cycle` optimizer steps: a variant that repels on every k-th step is timed over whole
    k-step cycles (a median over single steps would pick one kind of step)."""
    def step():
        for i in range(cycle):
            with autocast(), native_batch_norm_derivatives() if native_bn else contextlib.nullcontext():
                loss, _, _ = method.loss(ensemble, x, y, step=i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return step


def _status_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))


def step_peak_mib(step, device: torch.device) -> float | None:
    """Memory one step needs above what was held before it (activations, autograd graph, gradients).

    CUDA: the caching allocator's peak. CPU (Linux): the peak resident set, after handing freed heap
    back to the system and resetting the kernel's high-water mark; elsewhere not measured.
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


def measure(model: str, m: int, batch: int, device: torch.device, classes: int, min_run_time: float, bf16: bool,
            channels_last: bool, variants: list[str], execution: str) -> list[dict]:
    x, y, proj = synthetic_batch(batch, classes, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    methods, native_bn = {"de": DeepEnsemble()}, {"de": False}
    for variant in variants:
        opts = dict(kv.split("=") for kv in variant.split(":")[1:])
        native_bn[variant] = opts.pop("bn", "fast") == "native"
        cfg = MethodConfig(name="forde", alpha=0.5, **{k: type(getattr(MethodConfig, k))(v) for k, v in opts.items()})
        if m == 1:  # one member has no median bandwidth (ln 1 = 0): time it with a fixed bandwidth
            cfg.bandwidth = 1.0
        methods[variant] = FoRDE(cfg, proj)
    steps, peaks, cycles = {}, {}, {}
    for name, method in methods.items():
        ens = build_ensemble(MODELS[model], m, (3, 32, 32), classes, seed=0).to(device).train()
        ens.execution = execution
        if channels_last:
            ens = ens.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(ens.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
        cycles[name] = getattr(getattr(method, "cfg", None), "repulsion_every", 1)
        steps[name] = make_step(method, ens, x, y, opt, autocast, cycles[name], native_bn[name])
        for _ in range(3 if device.type == "cuda" else 1):  # warm-up: allocator, kernels, autotuning
            steps[name]()
        peaks[name] = step_peak_mib(steps[name], device)
    times = {n: [] for n in steps}
    for _ in range(3):  # alternate: DE, FoRDE, DE, FoRDE, ...
        for name, step in steps.items():
            t = benchmark.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time)
            times[name].append(t.median / cycles[name])
    med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    return [{"model": model, "M": m, "batch": batch, "execution": execution, "variant": v, "de_s": med["de"], "forde_s": med[v],
             "ratio": med[v] / med["de"], "de_img_s": batch / med["de"], "forde_img_s": batch / med[v],
             "de_peak_mib": peaks.get("de"), "forde_peak_mib": peaks.get(v)} for v in variants]


def table(rows: list[dict]) -> str:
    head = ("| model | M | batch | execution | FoRDE variant | DE step (ms) | FoRDE step (ms) | FoRDE / DE | DE img/s | FoRDE img/s "
            "| step peak MiB DE / FoRDE |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        peak = f"{r['de_peak_mib']:.0f} / {r['forde_peak_mib']:.0f}" if r["de_peak_mib"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['M']} | {r['batch']} | {r['execution']} | {r['variant']} | {1e3 * r['de_s']:.1f} | {1e3 * r['forde_s']:.1f} | "
                     f"{r['ratio']:.2f} | {r['de_img_s']:.0f} | {r['forde_img_s']:.0f} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="small_resnet")
    p.add_argument("--sizes", default="1,4,10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", type=int, default=100, help="100 = CIFAR-100 shapes")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per timing block")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--variants", default="forde", help="FoRDE variants, e.g. forde,forde:repulsion_every=2,"
                                                         "forde:repulsion_subset=0.25; forde:bn=native times the "
                                                         "PyTorch derivatives of batch norm")
    p.add_argument("--execution", default="loop", help="loop, vmap, or both: loop,vmap (see model.execution)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for model in args.models.split(","):
        for m in map(int, args.sizes.split(",")):
            for execution in args.execution.split(","):
                new = measure(model, m, args.batch, device, args.classes, args.min_run_time, args.bf16,
                              args.channels_last, args.variants.split(","), execution)
                rows += new
                print("\n".join(table(new).splitlines()[2:]), flush=True)
    out = args.out or Path(__file__).parent / "results" / f"step_time-{device.type}.md"
    write_report(out, f"Training step time, {device.type}", ["", *table(rows).splitlines()])


if __name__ == "__main__":
    main()
