"""Run directories with known numbers, written without training, for the report's tests and for looking at its
figures: `python tests/report_synthetic.py OUT` writes a study shaped like paper_lite_cifar10 (5 methods, 3 seeds,
DE and FoRDE-PCA at 5, 19 corruptions x 5 severities, its grid in an Optuna study.db) to OUT."""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import yaml

from forde.data.corruption_names import CORRUPTIONS

SEVERITIES = (1, 2, 3, 4, 5)


def write_run(root: Path, name: str, method: str, seed: int, summary: dict, alpha: float | None = None,
              per_set: list[dict] | None = None, size: int = 4, dataset: str = "cifar10",
              seconds: tuple[float, float] = (300.0, 200.0)) -> Path:
    """One run directory as `forde train` leaves it: config.yaml and results.json (only what the report reads)."""
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    config = {"seed": seed, "ensemble_size": size, "data": {"name": dataset},
              "model": {"name": "resnet18", "width": 16, "blocks": [1, 1, 1, 1]},
              "method": {"name": method, "alpha": 1.0 if alpha is None else alpha}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"summary": summary, "train_time_s": seconds[0], "eval_time_s": seconds[1]}
    if per_set:
        results["corrupted"] = {"per_set": per_set}
    (run / "results.json").write_text(json.dumps(results))
    return run


def clean_summary(accuracy: float, nll: float = 1.0, ece: float = 0.05) -> dict:
    return {"test/accuracy": accuracy, "test/nll": nll, "test/ece": ece}


def full_summary(accuracy: float, nll: float, ece: float, drop: float, diversity: float, epistemic: float,
                 rng: random.Random) -> tuple[dict, list[dict]]:
    """A summary and per-set rows with corrupted results that fall with severity, as a trained ensemble's do."""
    summary = clean_summary(accuracy, nll, ece)
    summary.update({"test/grad_cosine_distance": diversity, "test/epistemic": epistemic})
    per_set = []
    for k in SEVERITIES:
        rows = [{"corruption": c, "severity": k, "source": "generated",
                 "accuracy": max(0.05, accuracy - drop * k * (0.5 + (i % 7) / 6) + rng.gauss(0, 0.01)),
                 "nll": nll + 0.08 * k * (0.5 + (i % 5) / 4) + rng.gauss(0, 0.01), "ece": max(0.0, ece - 0.005 * k + rng.gauss(0, 0.005))}
                for i, c in enumerate(CORRUPTIONS)]
        per_set += rows
        mean = {m: sum(r[m] for r in rows) / len(rows) for m in ("accuracy", "nll", "ece")}
        summary.update({f"corrupted/severity_{k}/{m}": v for m, v in mean.items()})
        summary[f"corrupted/severity_{k}/grad_cosine_distance"] = diversity + 0.002 * k
        summary[f"corrupted/severity_{k}/epistemic"] = epistemic * (1 + 0.1 * k)
    for group, ks in (("", SEVERITIES), ("/severity_1-3", (1, 2, 3)), ("/severity_4-5", (4, 5))):
        for m in ("accuracy", "nll", "ece"):
            summary[f"corrupted{group}/{m}"] = sum(summary[f"corrupted/severity_{k}/{m}"] for k in ks) / len(ks)
    summary["corrupted/ece_set_mean"] = summary["corrupted/ece"] + 0.01
    summary["corrupted/regenerated_sets"] = len(per_set)
    return summary, per_set


# variant -> (method, alpha, seeds, clean accuracy, NLL, ECE, accuracy lost per severity, gradient diversity, epistemic)
PAPER_LITE = {
    "DE": ("de", None, 5, 0.541, 1.267, 0.052, 0.022, 0.55, 0.041),
    "LIT": ("lit", None, 3, 0.541, 1.270, 0.060, 0.027, 0.99, 0.060),
    "FoRDE-Identity": ("forde", 0.0, 3, 0.541, 1.278, 0.058, 0.023, 0.57, 0.041),
    "FoRDE-Tuned (α=0.2)": ("forde", 0.2, 3, 0.544, 1.277, 0.061, 0.023, 0.56, 0.042),
    "FoRDE-PCA": ("forde", 1.0, 5, 0.533, 1.283, 0.057, 0.023, 0.55, 0.040),
}


def paper_lite_study(out: Path) -> Path:
    """OUT/runs/trial-NNNN (the grid: seeds 0-2 in the outer loop) and OUT/extra (seeds 3 and 4 of DE and
    FoRDE-PCA), plus the grid's Optuna study in OUT/study.db: what the shipped study leaves behind."""
    import optuna

    rng = random.Random(0)
    grid = [(v, s) for s in range(3) for v in PAPER_LITE] + [(v, s) for s in (3, 4) for v in ("FoRDE-PCA", "DE")]
    storage = f"sqlite:///{out / 'study.db'}"
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optuna.create_study(study_name="paper_lite_cifar10", storage=storage, direction="maximize")
        opt.set_metric_names(["corrupted/accuracy"])
    for number, (variant, seed) in enumerate(grid):
        method, alpha, _, acc, nll, ece, drop, diversity, epistemic = PAPER_LITE[variant]
        noise = rng.gauss(0, 0.012)
        summary, per_set = full_summary(acc + noise, nll - noise / 2 + rng.gauss(0, 0.01), ece + rng.gauss(0, 0.008),
                                        drop, diversity + rng.gauss(0, 0.01), epistemic + rng.gauss(0, 0.003), rng)
        folder, name = (out / "runs", f"trial-{number:04d}") if seed < 3 else (out / "extra", f"{method}-s{seed}")
        run = write_run(folder, name, method, seed, summary, alpha, per_set)
        if seed < 3:
            params = {"method.name": method, "seed": seed} | ({"method.alpha": alpha} if method == "forde" else {})
            dists = {"method.name": optuna.distributions.CategoricalDistribution(["de", "forde", "lit"]),
                     "seed": optuna.distributions.CategoricalDistribution([0, 1, 2]),
                     "method.alpha": optuna.distributions.CategoricalDistribution([0.0, 0.2, 1.0])}
            opt.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                    value=summary["corrupted/accuracy"], user_attrs={"run_dir": str(run)}))
    return out


if __name__ == "__main__":
    print(paper_lite_study(Path(sys.argv[1])))
