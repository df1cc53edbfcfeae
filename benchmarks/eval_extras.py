"""What the field's extra evaluation costs on top of the paper's: OOD detection, temperature scaling and the added
calibration and abstention metrics, against the final evaluation as it was (predictions and the paper's metrics on
the test set and every CIFAR-10-C set, gradient diversity on each).

    python benchmarks/eval_extras.py --root data                                  # all 95 -C sets
    python benchmarks/eval_extras.py --root data --corruptions gaussian_noise,fog  # 10 sets timed, 95 projected

One freshly initialised ResNet18 ensemble (speed does not depend on the weights), the run's own code paths:
`forde.evaluate.predictions_and_gradients` for the forward passes, `forde.metrics` for the metrics. Timed apart:
    existing  forward passes (test, validation, -C sets) with gradient diversity, and the paper's metrics
    extra     the two no-download OOD sets' forward passes and detection metrics, the temperature's fit, the added
              metrics (Brier, adaptive ECE, MCE, entropy, AURC, AUGRC) and every metric again at the temperature
"""

from __future__ import annotations

import argparse
import time

import torch
from report import write_report

from forde.calibration import fit_temperature
from forde.config import load_config
from forde.data.corrupted import corrupted_sets, prepare_corrupted
from forde.data.ood_sets import ood_sets
from forde.evaluate import ood_detection, predict_logits, predictions_and_gradients
from forde.methods.de import DeepEnsemble
from forde.metrics import (
    accuracy,
    ece,
    ensemble_log_probs,
    ensemble_metrics,
    epistemic_uncertainty,
    gradient_cosine_distance,
    nll,
)
from forde.setup import build


def paper_metrics(member_lp: torch.Tensor, labels: torch.Tensor, grads) -> None:
    """The metrics the evaluation computed before the field's were added."""
    lp = ensemble_log_probs(member_lp)
    accuracy(lp, labels), nll(lp, labels), ece(lp, labels), epistemic_uncertainty(member_lp)
    if grads is not None:
        gradient_cosine_distance(grads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--corruptions", default="all", help="the corruptions timed (5 severities each; 95 projected)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = load_config(
        "cifar10",
        [
            f"device={args.device}",
            f"data.root={args.root}",
            f"ensemble_size={args.members}",
            f"model.width={args.width}",
            "data.val_fraction=0.1",
            f"eval.corruptions=[{args.corruptions}]",
            "run.progress=false",
        ],
    )
    setup = build(cfg, method=DeepEnsemble())
    prepare_corrupted(cfg, setup.dataset)
    ens, ctx, ds = setup.ensemble, setup.eval_ctx, setup.dataset
    assert ds.val is not None
    existing = extra = 0.0
    clock = time.perf_counter

    def timed(fn, *a):
        t = clock()
        out = fn(*a)
        return out, clock() - t

    # the validation split: its forward pass was there before; fitting the temperature is new
    (val_logits, val_grads), s = timed(predictions_and_gradients, ens, ds.val, ctx)
    existing += s
    val_lp = val_logits.log_softmax(-1)
    _, s = timed(paper_metrics, val_lp, ds.val.labels, val_grads)
    existing += s
    temperature, s = timed(fit_temperature, ensemble_log_probs(val_lp), ds.val.labels)
    extra += s
    sets_seconds = {"existing": 0.0, "extra": 0.0}
    sets = [("test", ds.test)] + [(f"{c.corruption} s{c.severity}", c.load()) for c in corrupted_sets(cfg, ds)]
    test_logits = None
    for name, split in sets:
        (logits, grads), s_pass = timed(predictions_and_gradients, ens, split, ctx)
        lp = logits.log_softmax(-1)
        _, s_paper = timed(paper_metrics, lp, split.labels, grads)
        t = clock()
        ensemble_metrics(lp, split.labels, grads, temperature)  # everything reported now
        s_all = clock() - t
        share = "existing" if name == "test" else "sets"
        if share == "existing":
            existing += s_pass + s_paper
            extra += max(s_all - s_paper, 0.0)
            test_logits = logits
        else:
            sets_seconds["existing"] += s_pass + s_paper
            sets_seconds["extra"] += max(s_all - s_paper, 0.0)
        print(f"{name}: {s_pass + s_all:.1f} s", flush=True)
    scale = 95 / (len(sets) - 1)  # project the timed -C sets to all 95
    existing += sets_seconds["existing"] * scale
    extra += sets_seconds["extra"] * scale
    ood_s = 0.0
    for ood in ood_sets(cfg, ds):
        t = clock()
        images = ood.load()
        from forde.data.base import Split

        logits = predict_logits(ens, Split(images, torch.zeros(len(images), dtype=torch.int64)), ctx)
        ood_detection(test_logits, logits, temperature)
        ood_s += clock() - t
    extra += ood_s
    lines = [
        f"CIFAR-10 ({len(ds.test):,} test, {len(ds.val):,} validation images) and CIFAR-10-C, ResNet18 width "
        f"{cfg.model.width}, M = {cfg.ensemble_size}, batch {cfg.eval.batch_size}, gradient diversity on "
        f"{cfg.eval.grad_samples} images per set; {setup.settings.describe()}; {len(sets) - 1} of the 95 -C sets "
        "timed, the rest projected (linear in sets).",
        "",
        "| part | seconds |",
        "|---|---:|",
        f"| existing: forward passes and the paper's metrics (validation, test, 95 -C sets) | {existing:.1f} |",
        f"| extra: the added metrics and every metric at the temperature (test, 95 -C sets) | {extra - ood_s:.1f} |",
        f"| extra: two no-download OOD sets, forward passes and detection | {ood_s:.1f} |",
        f"| extra, in all | {extra:.1f} |",
        "",
        f"The extra evaluation costs {100 * extra / existing:.1f}% of the existing (target: at most 15%).",
    ]
    write_report(
        args.out or f"benchmarks/results/eval_extras-{setup.device.type}.md",
        "The field's extra evaluation against the paper's",
        lines,
    )


if __name__ == "__main__":
    main()
