"""Evaluation of an ensemble on the clean test set and on every corruption x severity."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from forde import interrupts
from forde.config import EvalConfig
from forde.data.base import Dataset, Split, subset_split
from forde.data.corrupted import CorruptedSet
from forde.data.pipeline import eval_batches
from forde.ensemble import Ensemble
from forde.metrics import PooledMetrics, gradient_cosine_distance, prediction_metrics

log = logging.getLogger(__name__)

GRAD_SAMPLE_SEED = 0  # one fixed draw: every run scores gradient diversity on the same samples


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
            interrupts.check()
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
    """Members' input gradients [M, n, D] on `grad_samples` samples, eval-mode networks.

    The samples are a fixed class-stratified draw (seed GRAD_SAMPLE_SEED), not the first n: folder layouts
    are ordered by class. A test set and its corrupted copies (same labels, same order) get the same samples."""
    ensemble.eval()
    grads = []
    for x, y in ctx.batches(subset_split(split, ctx.grad_samples, GRAD_SAMPLE_SEED, "grad")):
        with ctx.autocast():
            _, g = ensemble.input_gradients(x, y, ctx.grad_target, create_graph=False)
        grads.append(g.float().cpu())
    return torch.cat(grads, 1)


def evaluate_split(ensemble: Ensemble, split: Split, ctx: EvalContext, pool: PooledMetrics | None = None) -> dict:
    """Metrics of one set; with `pool`, its predictions and gradients are also added to that pooled set."""
    member_log_probs = predict(ensemble, split, ctx)
    metrics = prediction_metrics(member_log_probs, split.labels)
    if pool is not None:
        pool.add(member_log_probs, split.labels)
    if ctx.grad_samples > 0 and len(ensemble) > 1:
        grads = input_gradients(ensemble, split, ctx)
        metrics["grad_cosine_distance"] = gradient_cosine_distance(grads)
        if pool is not None:
            pool.add_gradients(grads)
    return metrics


SEVERITY_GROUPS = {"severity_1-3": (1, 2, 3), "severity_4-5": (4, 5)}


def summarize_corrupted(per_set: list[dict], pooled: dict[int, dict]) -> dict:
    """cA / cNLL / cECE as the paper's release computes them, per severity and over severities.

    `pooled[k]` holds the metrics of severity k's corruption types pooled into one set; `all` and the
    groups of severities (1-3, 4-5) average those over their severities. `ece_set_mean` is the mean of
    the per-set ECEs instead (higher: the ECE of a pooled set is at most the mean of its parts' ECEs).
    Accuracy, NLL, epistemic uncertainty and gradient diversity of the pool equal the mean over its
    sets, as the sets have equal sizes.
    """
    def group(severities) -> dict:
        levels = [pooled[k] for k in severities if k in pooled]
        if not levels:
            return {}
        out = {key: sum(p[key] for p in levels) / len(levels) for key in levels[0] if all(key in p for p in levels)}
        eces = [r["ece"] for r in per_set if r["severity"] in severities]
        return {**out, "ece_set_mean": sum(eces) / len(eces)}

    summary = {"all": group(sorted(pooled))}
    summary.update({f"severity_{k}": group((k,)) for k in sorted(pooled)})
    summary.update({name: group(sevs) for name, sevs in SEVERITY_GROUPS.items() if any(k in pooled for k in sevs)})
    return summary


def evaluate_corrupted(ensemble: Ensemble, sets: Iterable[CorruptedSet], ctx: EvalContext,
                       progress: Callable[[Iterable], Iterable] = lambda it: it) -> dict:
    """Per-set metrics (with each set's source: generated here or not) and the pooled summary."""
    per_set: list[dict] = []
    pools: dict[int, PooledMetrics] = {}
    for s in progress(sets):
        pool = pools.setdefault(s.severity, PooledMetrics())
        row = {"corruption": s.corruption, "severity": s.severity, "source": s.provenance["source"],
               **evaluate_split(ensemble, s.load(), ctx, pool)}
        row.pop("member_accuracy")
        per_set.append(row)
        log.debug("%s s%d: acc %.4f nll %.4f", s.corruption, s.severity, row["accuracy"], row["nll"])
    pooled = {k: p.result() for k, p in pools.items()}
    return {"per_set": per_set, "summary": summarize_corrupted(per_set, pooled) if per_set else {}}


def eval_context(cfg: EvalConfig, dataset: Dataset, device: torch.device, grad_target: str, **kw) -> EvalContext:
    return EvalContext(device, dataset.mean, dataset.std, cfg.batch_size, cfg.grad_samples, grad_target, **kw)
