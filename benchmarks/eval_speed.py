"""Time to evaluate an ensemble on a corrupted test set (CIFAR-10-C layout, every corruption x severity).

    python benchmarks/eval_speed.py --dataset cifar10 --root data                      # all 95 sets
    python benchmarks/eval_speed.py --dataset cifar10 --root data --sets 10 --members 10 --width 64

The ensemble's weights do not matter for speed, so it is freshly initialised. Reports images/s of the
predictions (every image, every member) and of the input-gradient diversity metric (a fixed
class-stratified draw of `--grad-samples` images of each set), and the wall time for the sets timed; with `--sets` below 95 the
whole-set time is a projection, labelled as such. Missing corrupted sets are generated first (not timed).
"""

from __future__ import annotations

import argparse
import time

import torch
from report import write_report

from forde.config import ModelConfig, TrainConfig
from forde.data.corrupted import corrupted_sets, prepare_corrupted
from forde.data.registry import load_dataset
from forde.ensemble import build_ensemble
from forde.evaluate import eval_context, input_gradients, predict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--root", default="data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--width", type=int, default=16, help="ResNet18 first-stage width (64 = the paper's)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--grad-samples", type=int, default=1000)
    p.add_argument("--sets", type=int, default=95, help="how many (corruption, severity) sets to time")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    cfg = TrainConfig()
    cfg.data.name, cfg.data.root = args.dataset, args.root
    cfg.eval.batch_size, cfg.eval.grad_samples = args.batch, args.grad_samples
    ds = load_dataset(cfg.data)
    prepare_corrupted(cfg, ds)
    device = torch.device(args.device)
    ens = build_ensemble(ModelConfig(name="resnet18", width=args.width), args.members, ds.input_shape,
                         ds.num_classes, seed=0).to(device).eval()
    ctx = eval_context(cfg.eval, ds, device, "logit")
    sets = list(corrupted_sets(cfg, ds))[: args.sets]
    pred_s = grad_s = 0.0
    n_pred = n_grad = 0
    for s in sets:
        name, severity, split = s.corruption, s.severity, s.load()
        t = time.perf_counter()
        predict(ens, split, ctx)
        pred_s += time.perf_counter() - t
        t = time.perf_counter()
        g = input_gradients(ens, split, ctx)
        grad_s += time.perf_counter() - t
        n_pred, n_grad = n_pred + len(split), n_grad + g.shape[1]
        print(f"{name} s{severity}: {pred_s + grad_s:.0f} s so far", flush=True)
    total = pred_s + grad_s
    rows = [f"{args.dataset}-C, ResNet18 width {args.width}, M = {args.members}, batch {args.batch}, device {device}.", "",
            "| part | images | seconds | images/s |", "|---|---:|---:|---:|",
            f"| predictions (all members) | {n_pred:,} | {pred_s:.1f} | {n_pred / pred_s:,.0f} |",
            f"| input-gradient diversity | {n_grad:,} | {grad_s:.1f} | {n_grad / grad_s:,.0f} |", ""]
    if len(sets) == 95:
        rows.append(f"Measured: all 95 sets in {total / 60:.1f} min.")
    else:
        rows.append(f"Measured {len(sets)} of the 95 sets in {total:.1f} s; projection for all 95 (linear in sets): "
                    f"{total * 95 / len(sets) / 60:.1f} min.")
    write_report(args.out or f"benchmarks/results/eval_speed-{device.type}.md", "Evaluation on a corrupted test set", rows)


if __name__ == "__main__":
    main()
