"""Run the illustrative experiments and write figures (PNG + PDF) and their numbers (JSON + Markdown)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path

import torch

from forde.analysis import style
from forde.illustrative.experiment import (
    CLASSIFICATION,
    METHODS,
    REGRESSION,
    ToyConfig,
    run_classification,
    run_regression,
)
from forde.illustrative.plots import LABELS, classification_figure, regression_figure

log = logging.getLogger(__name__)

TASKS = {
    "regression": (REGRESSION, run_regression, regression_figure, "mean predictive std"),
    "classification": (CLASSIFICATION, run_classification, classification_figure, "mean predictive entropy (nats)"),
}


def run(out_dir: Path, tasks: tuple[str, ...] = tuple(TASKS), **overrides) -> dict:
    """Train, draw and write every task; `overrides` replace ToyConfig fields (e.g. steps, members)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    numbers = {}
    for task in tasks:
        base, train, draw, score_name = TASKS[task]
        cfg = dataclasses.replace(base, **overrides)
        panels, data = train(cfg)
        style.save(draw(panels, data), out_dir / f"illustrative_{task}")
        numbers[task] = {
            "score": score_name,
            "away_from_data": f"grid points farther than {cfg.far:g} from every training input",
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
            "methods": {name: {"score": p.score, "fit": p.fit, "final_step": p.stats} for name, p in panels.items()},
        }
    (out_dir / "illustrative_numbers.json").write_text(json.dumps(numbers, indent=2))
    (out_dir / "illustrative_numbers.md").write_text(markdown(numbers))
    print(markdown(numbers))
    return numbers


def markdown(numbers: dict) -> str:
    lines = []
    for task, entry in numbers.items():
        fit = "train RMSE" if task == "regression" else "train accuracy"
        lines += [
            f"### {task}: {entry['score']} away from the data",
            f"({entry['away_from_data']}; {entry['config']['members']} members, {entry['config']['steps']} "
            f"steps of batch {entry['config']['batch_size']}, seed {entry['config']['seed']})",
            "",
            f"| method | {entry['score']} | {fit} |",
            "|---|---:|---:|",
        ]
        lines += [f"| {LABELS.get(m, m)} | {v['score']:.4f} | {v['fit']:.4f} |" for m, v in entry["methods"].items()]
        if task == "classification":
            lines.append(f"\n(maximum entropy with 5 classes: ln 5 = {math.log(5):.4f})")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The paper's illustrative 1-D regression and 2-D classification (Sec. 5.1)")
    p.add_argument("--out", type=Path, default=Path("figures/illustrative"))
    p.add_argument("--task", choices=tuple(TASKS), action="append", help="default: both")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="default: all four")
    for name in ("members", "steps", "seed"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--threads", type=int, default=1, help="CPU threads; tiny networks run fastest on one")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(ToyConfig) if getattr(args, f.name, None) is not None
    }
    if args.methods:
        overrides["methods"] = tuple(args.methods)
    run(args.out, tuple(args.task or TASKS), **overrides)
    return 0
