"""What FoRDE's cost-cutting options cost in accuracy: full FoRDE vs repulsion every k-th step vs the
kernel on a subset of the batch, with DE as the reference, trained with the same seeds.

    python benchmarks/cost_options.py                                  # quickstart (digits, MLP), 3 seeds
    python benchmarks/cost_options.py --config cifar10 --seeds 0 optim.epochs=10 model.width=16 ensemble_size=4

Reports per variant: mean training time per epoch relative to DE, clean test accuracy / NLL, and
cA / cNLL (means over every corruption x severity), averaged over the seeds. Step-time ratios at
fixed shapes come from benchmarks/step_time.py; this script measures whole training runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from report import write_report

from forde.config import load_config
from forde.train import train

VARIANTS = {
    "DE": ["method.name=de"],
    "FoRDE": [],
    "FoRDE, repulsion every 2nd step": ["method.repulsion_every=2"],
    "FoRDE, kernel on 1/4 of each batch": ["method.repulsion_subset=0.25"],
}
COLUMNS = (("test/accuracy", "accuracy"), ("test/nll", "NLL"), ("corrupted/accuracy", "cA"), ("corrupted/nll", "cNLL"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quickstart")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cost_options.md")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = Path(tempfile.mkdtemp(prefix="forde-cost-"))
    results: dict[str, list[dict]] = {}
    for name, extra in VARIANTS.items():
        for seed in seeds:
            cfg = load_config(
                args.config,
                [
                    *args.overrides,
                    *extra,
                    f"seed={seed}",
                    "run.progress=false",
                    f"run.out_dir={runs}",
                    f"run.name={len(results)}-{seed}",
                ],
            )
            res = train(cfg)
            results.setdefault(name, []).append({**res["summary"], "epoch_s": res["train_time_s"] / res["epochs"]})
            print(
                f"{name}, seed {seed}: "
                + ", ".join(f"{label} {res['summary'][k]:.4f}" for k, label in COLUMNS if k in res["summary"]),
                flush=True,
            )

    def mean(name, key):
        return statistics.fmean(r[key] for r in results[name])

    de_epoch = mean("DE", "epoch_s")
    head = ["variant", "epoch time / DE", *(label for _, label in COLUMNS)]
    rows = [
        f"config `{args.config}` {' '.join(args.overrides)}, seeds {seeds}; means over seeds.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name in VARIANTS:
        cells = [f"{mean(name, k):.4f}" if k in results[name][0] else "n/a" for k, _ in COLUMNS]
        rows.append(f"| {name} | {mean(name, 'epoch_s') / de_epoch:.2f} | " + " | ".join(cells) + " |")
    write_report(args.out, "FoRDE cost-cutting options", rows)


if __name__ == "__main__":
    main()
