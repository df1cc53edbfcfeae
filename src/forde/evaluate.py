"""Evaluation of an ensemble on the clean test set and on every corruption x severity."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from forde import interrupts
from forde.calibration import Temperature
from forde.config import EvalConfig
from forde.data.base import Dataset, Split, subset_split
from forde.data.corrupted import CorruptedSet
from forde.data.ood_sets import OODSet
from forde.data.pipeline import eval_batches
from forde.ensemble import Ensemble
from forde.metrics import CorruptedMetrics, ensemble_metrics

log = logging.getLogger(__name__)

GRAD_SAMPLE_SEED = 0  # one fixed draw: every run scores gradient diversity on the same samples


class Sampler(Protocol):
    """Draws of a stochastic ensemble: `use(s)` sets every member to its s-th draw for the block."""

    samples: int

    def use(self, draw: int) -> contextlib.AbstractContextManager: ...


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
    sampler: Sampler | None = None  # a method that predicts by averaging draws (SWAG, node-BNN); None: one pass

    def batches(self, split: Split) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in eval_batches(split, self.batch_size, self.mean, self.std, self.device):
            interrupts.check()
            yield self.prepare(x), y


@torch.no_grad()
def predict_logits(ensemble: Ensemble, split: Split, ctx: EvalContext) -> torch.Tensor:
    """Member logits [M, N, C] (float32, on the CPU) in the split's order.

    With a sampler, each member's log of its probabilities averaged over the draws: the member's model average,
    a valid set of logits for every metric (softmax gives the averaged probabilities back)."""
    if ctx.sampler is None:
        return _one_pass(ensemble, split, ctx)
    total = None
    for draw in range(ctx.sampler.samples):
        with ctx.sampler.use(draw):
            lp = _one_pass(ensemble, split, ctx).log_softmax(-1)
        total = lp if total is None else torch.logaddexp(total, lp)
    assert total is not None  # samples >= 1
    return total - math.log(ctx.sampler.samples)


def _one_pass(ensemble: Ensemble, split: Split, ctx: EvalContext) -> torch.Tensor:
    ensemble.eval()
    outs = []
    for x, _ in ctx.batches(split):
        with ctx.autocast():
            outs.append(ensemble(x).float().cpu())
    return torch.cat(outs, 1)


def predict(ensemble: Ensemble, split: Split, ctx: EvalContext) -> torch.Tensor:
    """Member log-probabilities [M, N, C] (float32, on the CPU) in the split's order."""
    return predict_logits(ensemble, split, ctx).log_softmax(-1)


def input_gradients(ensemble: Ensemble, split: Split, ctx: EvalContext) -> torch.Tensor:
    """Members' input gradients [M, n, D] on `grad_samples` samples, eval-mode networks.

    The samples are a fixed class-stratified draw (seed GRAD_SAMPLE_SEED), not the first n: folder layouts
    are ordered by class. A test set and its corrupted copies (same labels, same order) get the same samples.
    With a sampler, the gradients of its first draw."""
    ensemble.eval()
    grads = []
    with ctx.sampler.use(0) if ctx.sampler is not None else contextlib.nullcontext():
        for x, y in ctx.batches(subset_split(split, ctx.grad_samples, GRAD_SAMPLE_SEED, "grad")):
            with ctx.autocast():
                _, g = ensemble.input_gradients(x, y, ctx.grad_target, create_graph=False)
            grads.append(g.float().cpu())
    return torch.cat(grads, 1)


def predictions_and_gradients(
    ensemble: Ensemble, split: Split, ctx: EvalContext
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Member logits [M, N, C], and input gradients [M, n, D] where gradient diversity is measured."""
    member_logits = predict_logits(ensemble, split, ctx)
    grads = input_gradients(ensemble, split, ctx) if ctx.grad_samples > 0 and len(ensemble) > 1 else None
    return member_logits, grads


def evaluate_split(ensemble: Ensemble, split: Split, ctx: EvalContext, temperature: Temperature | None = None) -> dict:
    """The metrics of one set (`metrics.ensemble_metrics`)."""
    member_logits, grads = predictions_and_gradients(ensemble, split, ctx)
    return ensemble_metrics(member_logits.log_softmax(-1), split.labels, grads, temperature)


def evaluate_corrupted(
    ensemble: Ensemble,
    sets: Iterable[CorruptedSet],
    ctx: EvalContext,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    temperature: Temperature | None = None,
) -> dict:
    """Per-set metrics (with each set's source: generated here or not) and the pooled summary."""
    corrupted = CorruptedMetrics(temperature=temperature)
    for s in progress(sets):
        split = s.load()
        member_logits, grads = predictions_and_gradients(ensemble, split, ctx)
        row = corrupted.add(
            s.corruption, s.severity, member_logits.log_softmax(-1), split.labels, grads, source=s.provenance["source"]
        )
        log.debug("%s s%d: acc %.4f nll %.4f", s.corruption, s.severity, row["accuracy"], row["nll"])
    return {"per_set": corrupted.per_set, "summary": corrupted.summary()}


def eval_context(cfg: EvalConfig, dataset: Dataset, device: torch.device, grad_target: str, **kw) -> EvalContext:
    return EvalContext(device, dataset.mean, dataset.std, cfg.batch_size, cfg.grad_samples, grad_target, **kw)


def ood_detection(
    member_logits_in: torch.Tensor, member_logits_out: torch.Tensor, temperature: Temperature | None
) -> dict:
    """Every detection metric (forde.ood.DETECTION) of every score (forde.ood.SCORES) for one OOD set, keyed
    `<metric>_<score>`; with a temperature, the scores it changes (msp, entropy) once more under `ts/`."""
    from forde.metrics import calibrated_log_probs, entropy
    from forde.ood import detection_metrics, ood_scores

    scores_in, scores_out = ood_scores(member_logits_in), ood_scores(member_logits_out)
    out = {}
    for score in scores_in:
        for metric, value in detection_metrics(scores_in[score], scores_out[score]).items():
            out[f"{metric}_{score}"] = value
    if temperature is not None:

        def calibrated(logits: torch.Tensor) -> dict[str, torch.Tensor]:
            lp = calibrated_log_probs(logits.double().log_softmax(-1), temperature)
            return {"msp": lp.max(-1).values.exp(), "entropy": -entropy(lp)}

        ts_in, ts_out = calibrated(member_logits_in), calibrated(member_logits_out)
        for score in ts_in:
            for metric, value in detection_metrics(ts_in[score], ts_out[score]).items():
                out[f"ts/{metric}_{score}"] = value
    return out


def evaluate_ood(
    ensemble: Ensemble,
    member_logits_in: torch.Tensor,
    sets: Iterable[OODSet],
    ctx: EvalContext,
    temperature: Temperature | None = None,
) -> dict:
    """{set: detection metrics} with the in-distribution test set's logits as the positives; one OOD set in memory
    at a time, and of it only its scores once predicted."""
    results = {}
    for s in sets:
        images = s.load()
        logits = predict_logits(ensemble, Split(images, torch.zeros(len(images), dtype=torch.int64)), ctx)
        results[s.name] = ood_detection(member_logits_in, logits, temperature)
        log.debug("OOD %s: AUROC (MSP) %.4f", s.name, results[s.name]["auroc_msp"])
    return results
