"""One real training epoch of DE and of FoRDE: the project's Trainer, input pipeline included.

    python benchmarks/epoch_time.py --device cuda                                  # the device's default settings
    python benchmarks/epoch_time.py --device cuda precision=bf16 channels_last=true cuda.graphs=true
    python benchmarks/epoch_time.py --device cpu --images 2560 --members 4 model.width=16   # a quick look

The data have CIFAR-100's shapes (`--images` uint8 32x32 RGB training images, 100 classes; 50,000 by default,
as in CIFAR-10/100), random, since the time of an epoch does not depend on the pixels; the on-device pipeline
shuffles, crops, flips and normalises them as in training. FoRDE's projection is a random orthogonal basis with
PCA-like weights (alpha 0.5), for the same reason. `--warmup-steps` eager steps on a few batches come first
(cuDNN autotuning, CUDA graph capture), then one timed epoch per method, DE and FoRDE alternating over
`--rounds`. Config overrides (key=value) apply to both methods. Writes benchmarks/results/epoch_time-<device>.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from report import write_report
from step_time import synthetic_batch

from forde.config import load_config
from forde.data.base import Dataset, Split
from forde.methods import build_method
from forde.methods.forde import FoRDE
from forde.setup import build
from forde.train import Trainer


def cifar100_shaped(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (n,), generator=g)
    test = Split(images[:1000], labels[:1000])
    return Dataset(
        "cifar100-shaped",
        Split(images, labels),
        test,
        num_classes=100,
        mean=(0.507, 0.487, 0.441),
        std=(0.267, 0.256, 0.276),
    )


def trainer_for(method_name: str, args, dataset: Dataset, run_dir: Path) -> Trainer:
    cfg = load_config(
        "cifar100",
        [
            f"device={args.device}",
            f"ensemble_size={args.members}",
            f"method.name={method_name}",
            "method.alpha=0.5",
            "run.progress=false",
            *args.overrides,
        ],
    )
    proj = synthetic_batch(2, 100, torch.device("cpu"))[2]
    method = (
        FoRDE(cfg.method, proj.to(args.device))
        if method_name == "forde"
        else build_method(cfg, dataset, torch.device(args.device))
    )
    return Trainer(build(cfg, dataset=dataset, method=method), run_dir / method_name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--members", type=int, default=10)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1, help="timed epochs per method, alternating")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="config overrides for both methods, e.g. precision=bf16")
    args = p.parse_args()
    dataset = cifar100_shaped(args.images)
    times: dict[str, list[dict]] = {"de": [], "forde": []}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: trainer_for(m, args, dataset, Path(tmp)) for m in times}
        settings = trainers["forde"].s.settings.describe()
        for name, t in trainers.items():  # warm-up steps, as the training loop takes them
            for i, (x, y) in zip(range(args.warmup_steps), t.loader):
                t.step(t.s.prepare(x), y, step=i)
                t.optimizer.step()
            print(f"{name}: warmed up with {args.warmup_steps} steps", flush=True)
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                metrics = trainer.train_epoch()
                times[name].append(metrics)
                print(
                    f"{name}: epoch {metrics['train/epoch_time_s']:.1f} s, {metrics['train/images_per_s']:.0f} images/s",
                    flush=True,
                )

    def median(rows):
        return sorted(r["train/epoch_time_s"] for r in rows)[len(rows) // 2]

    de, forde = median(times["de"]), median(times["forde"])
    cfg = trainers["forde"].cfg
    images = len(trainers["de"].loader) * cfg.optim.batch_size
    lines = [
        f"{cfg.model.name} width {cfg.model.width}, M = {args.members}, batch {cfg.optim.batch_size}, "
        f"{args.images:,} training images of CIFAR-100's shapes per epoch (the last incomplete batch dropped), "
        f"data on the device with crop, flip and normalisation; {settings}; median of {args.rounds} epoch(s).",
        "",
        "| method | epoch (s) | images/s | / DE |",
        "|---|---:|---:|---:|",
        f"| DE | {de:.1f} | {images / de:,.0f} | 1.00 |",
        f"| FoRDE (alpha 0.5) | {forde:.1f} | {images / forde:,.0f} | {forde / de:.2f} |",
    ]
    out = args.out or Path(__file__).parent / "results" / f"epoch_time-{torch.device(args.device).type}.md"
    write_report(out, f"Training epoch time, {torch.device(args.device).type}", lines)


if __name__ == "__main__":
    main()
