"""The sweep's own cost per trial, and whether it grows with the study: a real worker loop (the budget lock, the
one read of the study, the decision, Optuna's ask with a random sampler, the trial's records, tell) around a
stand-in training that sleeps for `--trial-s` seconds. The gap between trials is the time from one trial's end
to the next one's start, in wall time and in the worker's CPU time (which other processes on the machine hardly
change); reported at the 10th, 100th and 1000th trial (median of the 9 gaps before each). The storages are
measured at the same time, one process each.

    python benchmarks/sweep_overhead.py [--trials 1000] [--trial-s 1.0] [--storages sqlite journal]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from report import write_report

from forde.sweep.storage import SweepStorage
from forde.sweep.study import read_study
from forde.sweep.worker import run_worker

STUDY = """name: overhead
base: quickstart
n_trials: {n}
objectives: [{{metric: test/nll, direction: minimize}}]
sampler: {{name: random, seed: 0}}
search_space:
  ensemble_size: {{choices: [3, 4, 5]}}
  method.alpha: {{low: 0.0, high: 1.0}}
  method.bandwidth_scale: {{low: 0.5, high: 2.0, log: true}}
  optim.lr: {{low: 0.01, high: 0.1, log: true}}
"""


class StandIn:
    """A training that takes `seconds` and returns a result; it notes when each trial starts and ends (wall and
    CPU time)."""

    def __init__(self, seconds: float):
        self.seconds, self.starts, self.ends = seconds, [], []

    def __call__(self, cfg, callbacks=()) -> dict:
        self.starts.append((time.perf_counter(), time.process_time()))
        time.sleep(self.seconds)
        self.ends.append((time.perf_counter(), time.process_time()))
        return {"summary": {"test/nll": cfg.optim.lr}}

    def gaps(self, clock: int) -> list[float]:
        return [start[clock] - end[clock] for start, end in zip(self.starts[1:], self.ends)]


def measure(kind: str, trials: int, seconds: float) -> tuple[list[float], list[float], float]:
    """Wall-time gaps, CPU-time gaps, and minutes taken, for one storage in a folder of its own."""
    logging.basicConfig(level=logging.WARNING)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / f"{kind}.yaml"
        path.write_text(STUDY.format(n=trials))
        study = read_study(path)
        url = f"sqlite:///{folder / 'study.db'}" if kind == "sqlite" else f"journal:{folder / 'journal.log'}"
        stand_in = StandIn(seconds)
        assert run_worker(study, SweepStorage(url), folder / kind, use_wandb=False, train_fn=stand_in) == 0
        assert len(stand_in.starts) == trials
    return stand_in.gaps(0), stand_in.gaps(1), (time.perf_counter() - began) / 60


def at(gaps: list[float], trial: int) -> float:
    """Median gap over the 9 gaps before `trial` (gap i is between trials i and i + 1, counting from 1)."""
    window = gaps[max(0, trial - 10) : trial - 1]
    return statistics.median(window)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--trial-s", type=float, default=1.0)
    p.add_argument("--storages", nargs="+", default=["sqlite", "journal"], choices=["sqlite", "journal"])
    p.add_argument("--out", default="benchmarks/results/sweep_overhead.md")
    args = p.parse_args()
    marks = [m for m in (10, 100, 1000) if m <= args.trials]
    with ProcessPoolExecutor(len(args.storages)) as pool:
        runs = list(
            pool.map(measure, args.storages, [args.trials] * len(args.storages), [args.trial_s] * len(args.storages))
        )
    rows = []
    for kind, (wall, cpu, minutes) in zip(args.storages, runs):
        for clock, gaps in (("wall", wall), ("CPU", cpu)):
            values = [at(gaps, m) for m in marks]
            rows.append(
                f"| {kind} | {clock} | "
                + " | ".join(f"{v * 1000:.1f}" for v in values)
                + f" | {max(values) / min(values):.2f} | {max(gaps) * 1000:.0f} | {minutes:.1f} |"
            )
    head = (
        "| storage | clock | "
        + " | ".join(f"gap at trial {m} (ms)" for m in marks)
        + " | largest / smallest | worst single gap (ms) | minutes |"
    )
    body = [
        f"{args.trials} trials of {args.trial_s:g} s (a stand-in training), one worker per storage (both at "
        "once), random sampler, W&B off; each gap is the median of the 9 gaps before that trial, in wall time "
        "and in the worker's CPU time.",
        "",
        head,
        "|---" * (len(marks) + 5) + "|",
        *rows,
    ]
    write_report(args.out, "Sweep overhead per trial", body)


if __name__ == "__main__":
    main()
