"""A short real training of DE and FoRDE on CIFAR-10: the whole loop (data, steps, per-epoch evaluation) end to end.

    python benchmarks/short_training.py --root data --epochs 3                 # ResNet18, M = 10, the device's defaults
    python benchmarks/short_training.py --root data --epochs 1 ensemble_size=2 model.width=8 optim.batch_size=256

Trains the built-in `cifar10` recipe (ResNet18, SGD + Nesterov, the paper's schedule compressed to `--epochs`) once
with method.name=de and once with forde (alpha 1.0, the PCA kernel), same seed, and reports the time per epoch
and the clean test metrics of each. The training set must be under `--root` (e.g. `forde data import-folder`).
Config overrides (key=value) apply to both. Writes benchmarks/results/cifar10_training-<device>.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from report import write_report

from forde.config import load_config
from forde.device import resolve_settings
from forde.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--runs", type=Path, default=None, help="keep the run directories here (default: a temporary folder)"
    )
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="config overrides for both methods")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs or tmp
        for method in ("de", "forde"):
            cfg = load_config(
                "cifar10",
                [
                    f"data.root={args.root}",
                    f"device={args.device}",
                    f"optim.epochs={args.epochs}",
                    f"method.name={method}",
                    "eval.corruptions=[none]",
                    "run.progress=false",
                    "run.wandb.mode=disabled",
                    f"run.out_dir={runs}",
                    *args.overrides,
                ],
            )
            results = train(cfg)
            epoch = results["train_time_s"] / results["epochs"]  # training only; the first epoch includes warm-up
            rows.append((method, cfg, results, epoch))
            print(
                f"{method}: {results['epochs']} epochs, {epoch:.1f} s per epoch, test accuracy "
                f"{results['test']['accuracy']:.4f}",
                flush=True,
            )
    cfg = rows[-1][1]
    de_epoch = rows[0][3]
    lines = [
        f"CIFAR-10 (50,000 training images, 10,000 test), {cfg.model.name} width {cfg.model.width}, "
        f"M = {cfg.ensemble_size}, batch {cfg.optim.batch_size}, lr {cfg.optim.lr} on the paper's schedule over "
        f"{args.epochs} epoch(s); {resolve_settings(cfg).describe()}. Test metrics of the ensemble after the last epoch.",
        "",
        "| method | s / epoch | / DE | test accuracy | NLL | ECE | epistemic | gradient cosine distance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, _, r, epoch in rows:
        t = r["test"]
        lines.append(
            f"| {method} | {epoch:.1f} | {epoch / de_epoch:.2f} | {t['accuracy']:.4f} | {t['nll']:.4f} | "
            f"{t['ece']:.4f} | {t['epistemic']:.4f} | {t.get('grad_cosine_distance', float('nan')):.4f} |"
        )
    device = torch.device(args.device).type
    write_report(
        args.out or Path(__file__).parent / "results" / f"cifar10_training-{device}.md",
        f"Short CIFAR-10 training, {device}",
        lines,
    )


if __name__ == "__main__":
    main()
