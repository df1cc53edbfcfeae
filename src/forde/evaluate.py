"""Evaluation of an ensemble on the clean test set and on every corruption x severity."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from forde.config import EvalConfig
from forde.data.base import Dataset, Split
from forde.data.pipeline import eval_batches
from forde.ensemble import Ensemble
from forde.metrics import gradient_cosine_distance, prediction_metrics

log = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """What every evaluation needs besides the data: where to run, how to normalise, which output to differentiate."""

    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int
    grad_samples: int
    grad_target: str = "logit"
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # e.g. channels_last

    def batches(self, split: Split) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in eval_batches(split, self.batch_size, self.mean, self.std, self.device):
            yield self.prepare(x), y


@torch.no_grad()
def predict(ensemble: Ensemble, split: Split, ctx: EvalContext) -> torch.Tensor:
    """Member log-probabilities [M, N, C] (float32, on the CPU) in the split's order."""
    ensemble.eval()
    outs = []
    for x, _ in ctx.batches(split):
        with ctx.autocast():
            outs.append(ensemble(x).float().log_softmax(-1).cpu())
    return torch.cat(outs, 1)


def input_gradients(ensemble: Ensemble, split: Split, ctx: EvalContext) -> torch.Tensor:
    """Members' input gradients [M, n, D] on the first `grad_samples` samples, eval-mode networks."""
    ensemble.eval()
    grads = []
    for x, y in ctx.batches(split.subset(torch.arange(min(ctx.grad_samples, len(split))))):
        with ctx.autocast():
            _, g = ensemble.input_gradients(x, y, ctx.grad_target, create_graph=False)
        grads.append(g.float().cpu())
    return torch.cat(grads, 1)


def evaluate_split(ensemble: Ensemble, split: Split, ctx: EvalContext) -> dict:
    metrics = prediction_metrics(predict(ensemble, split, ctx), split.labels)
    if ctx.grad_samples > 0 and len(ensemble) > 1:
        metrics["grad_cosine_distance"] = gradient_cosine_distance(input_gradients(ensemble, split, ctx))
    return metrics


SUMMARY_KEYS = ("accuracy", "nll", "ece", "epistemic", "grad_cosine_distance")


def summarize_corrupted(per_set: list[dict]) -> dict:
    """cA / cNLL / cECE (means over every corruption x severity), per severity, and severities 1-3 and 4-5."""
    def mean_over(rows: list[dict]) -> dict:
        return {k: sum(r[k] for r in rows) / len(rows) for k in SUMMARY_KEYS if rows and all(k in r for r in rows)}

    summary = {"all": mean_over(per_set)}
    for s in sorted({r["severity"] for r in per_set}):
        summary[f"severity_{s}"] = mean_over([r for r in per_set if r["severity"] == s])
    for name, sevs in (("severity_1-3", {1, 2, 3}), ("severity_4-5", {4, 5})):
        rows = [r for r in per_set if r["severity"] in sevs]
        if rows:
            summary[name] = mean_over(rows)
    return summary


def evaluate_corrupted(ensemble: Ensemble, sets: Iterable[tuple[str, int, Split]], ctx: EvalContext,
                       progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict:
    per_set = []
    for corruption, severity, split in progress(sets):
        row = {"corruption": corruption, "severity": severity, **evaluate_split(ensemble, split, ctx)}
        row.pop("member_accuracy")
        per_set.append(row)
        log.debug("%s s%d: acc %.4f nll %.4f", corruption, severity, row["accuracy"], row["nll"])
    return {"per_set": per_set, "summary": summarize_corrupted(per_set) if per_set else {}}


def eval_context(cfg: EvalConfig, dataset: Dataset, device: torch.device, grad_target: str, **kw) -> EvalContext:
    return EvalContext(device, dataset.mean, dataset.std, cfg.batch_size, cfg.grad_samples, grad_target, **kw)
