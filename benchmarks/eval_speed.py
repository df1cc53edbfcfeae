"""Time to evaluate an ensemble on a corrupted test set (CIFAR-10-C layout, every corruption x severity).

    python benchmarks/eval_speed.py --dataset cifar10 --root data                      # all 95 sets
    python benchmarks/eval_speed.py --dataset cifar10 --root data --sets 10 --members 10 --width 64
    python benchmarks/eval_speed.py --run runs/cifar10-forde-M10-seed0 precision=bf16 channels_last=true

Evaluates as a run's final evaluation does (`forde.evaluate`): predictions of every member on every image of each
(corruption, severity) set, and the input-gradient diversity metric on a fixed class-stratified draw of
`eval.grad_samples` images of each set, with the run's device settings (config overrides such as precision=bf16
apply). `--run` evaluates a trained run directory's ensemble and reports its cA / cNLL / cECE too (pooled per
severity, as in results.json); otherwise a freshly initialised ResNet18 (speed does not depend on the weights).
Reports images/s of both parts and the wall time for the sets timed; with `--sets` below 95 the whole-set time is
a projection, labelled as such. Missing corrupted sets are generated first (not timed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from report import write_report

from forde.config import load_config
from forde.data.corrupted import corrupted_sets, prepare_corrupted
from forde.evaluate import input_gradients, predict
from forde.methods.de import DeepEnsemble
from forde.metrics import CorruptedMetrics
from forde.run_dir import CONFIG, load_checkpoint
from forde.setup import build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="a run directory: evaluate its trained ensemble")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--root", default="data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--width", type=int, default=16, help="ResNet18 first-stage width (64 = the paper's)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--grad-samples", type=int, default=1000)
    p.add_argument("--sets", type=int, default=95, help="how many (corruption, severity) sets to time")
    p.add_argument("--out", default=None)
    p.add_argument("--trust-code", action="store_true", help="build a network the run's config.yaml names as code")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. precision=bf16 channels_last=true")
    args = p.parse_args()

    common = [
        f"device={args.device}",
        f"eval.batch_size={args.batch}",
        f"eval.grad_samples={args.grad_samples}",
        "eval.corruptions=[all]",
        "run.progress=false",
    ]
    if args.run:
        cfg = load_config(
            args.run / CONFIG, [*common, f"data.root={args.root}", *args.overrides], trust_code=args.trust_code
        )
        setup = build(cfg)
        setup.ensemble.load_state_dict(load_checkpoint(args.run)["ensemble"])
        what = f"the trained ensemble of {args.run.name}"
    else:
        cfg = load_config(
            "cifar10",
            [
                *common,
                f"data.name={args.dataset}",
                f"data.root={args.root}",
                f"ensemble_size={args.members}",
                f"model.width={args.width}",
                *args.overrides,
            ],
        )
        setup = build(cfg, method=DeepEnsemble())  # the weights do not matter for speed, nor does the method
        what = "a freshly initialised ensemble"
    prepare_corrupted(cfg, setup.dataset)
    ens, ctx, device = setup.ensemble, setup.eval_ctx, setup.device
    sets = list(corrupted_sets(cfg, setup.dataset))[: args.sets]
    pred_s = grad_s = 0.0
    n_pred = n_grad = 0
    corrupted = CorruptedMetrics()
    for s in sets:
        name, severity, split = s.corruption, s.severity, s.load()
        t = time.perf_counter()
        log_probs = predict(ens, split, ctx)  # returns CPU tensors: the device has finished
        pred_s += time.perf_counter() - t
        t = time.perf_counter()
        grads = input_gradients(ens, split, ctx)
        grad_s += time.perf_counter() - t
        n_pred, n_grad = n_pred + len(split), n_grad + grads.shape[1]
        corrupted.add(name, severity, log_probs, split.labels, grads)
        print(f"{name} s{severity}: {pred_s + grad_s:.0f} s so far", flush=True)
    total = pred_s + grad_s
    summary = corrupted.summary()["all"]
    m = cfg.model
    lines = [
        f"{args.dataset}-C, {m.name} width {m.width}, M = {cfg.ensemble_size}, batch {cfg.eval.batch_size}, "
        f"{what}; {setup.settings.describe()}.",
        "",
        "| part | images | seconds | images/s |",
        "|---|---:|---:|---:|",
        f"| predictions (all members) | {n_pred:,} | {pred_s:.1f} | {n_pred / pred_s:,.0f} |",
        f"| input-gradient diversity | {n_grad:,} | {grad_s:.1f} | {n_grad / grad_s:,.0f} |",
        "",
    ]
    if len(sets) == 95:
        lines.append(f"Measured: all 95 sets in {total:.1f} s ({total / 60:.1f} min).")
    else:
        lines.append(
            f"Measured {len(sets)} of the 95 sets in {total:.1f} s; projection for all 95 (linear in sets): "
            f"{total * 95 / len(sets) / 60:.1f} min."
        )
    if args.run:
        lines.append(
            f"Over the sets evaluated: cA {summary['accuracy']:.4f}, cNLL {summary['nll']:.4f}, "
            f"cECE {summary['ece']:.4f}, gradient cosine distance {summary['grad_cosine_distance']:.4f}."
        )
    write_report(
        args.out or f"benchmarks/results/eval_speed-{device.type}.md", "Evaluation on a corrupted test set", lines
    )


if __name__ == "__main__":
    main()
