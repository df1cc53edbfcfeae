"""The corrupted-data summary as the paper's release computes it (each severity's sets pooled), against a
brute-force concatenation of the sets' predictions, and the fixed sample behind gradient diversity."""

import pytest
import torch

from forde.config import ModelConfig
from forde.data.base import Split, stratified_subset
from forde.data.corrupted import CorruptedSet
from forde.ensemble import build_ensemble
from forde.evaluate import GRAD_SAMPLE_SEED, EvalContext, evaluate_corrupted, input_gradients, predict
from forde.metrics import ece, gradient_cosine_distance, prediction_metrics

CLASSES, SIDE = 4, 6


def small_setup(grad_samples=0):
    ens = build_ensemble(ModelConfig(name="mlp", hidden=[16]), 3, (1, SIDE, SIDE), CLASSES, seed=0)
    ctx = EvalContext(torch.device("cpu"), (0.5,), (0.25,), batch_size=64, grad_samples=grad_samples)
    return ens, ctx


def random_set(seed: int, n: int = 120) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(
        torch.randint(0, 256, (n, 1, SIDE, SIDE), generator=g, dtype=torch.uint8),
        torch.randint(0, CLASSES, (n,), generator=g),
    )


def test_summary_pools_each_severity_and_averages_severities():
    ens, ctx = small_setup()
    sets = {(c, k): random_set(10 * k + c) for c in range(3) for k in (1, 2, 4)}
    result = evaluate_corrupted(ens, [CorruptedSet(f"c{c}", k, lambda s=s: s) for (c, k), s in sets.items()], ctx)
    summary = result["summary"]
    assert len(result["per_set"]) == 9 and all(r["source"] == "unknown" for r in result["per_set"])
    brute = {}
    for k in (1, 2, 4):  # brute force: the concatenated predictions of the severity's sets
        parts = [sets[(c, k)] for c in range(3)]
        lp = torch.cat([predict(ens, s, ctx) for s in parts], 1)
        brute[k] = prediction_metrics(lp, torch.cat([s.labels for s in parts]))
        for key in ("accuracy", "nll", "ece", "epistemic"):
            assert summary[f"severity_{k}"][key] == pytest.approx(brute[k][key], rel=1e-10)
        rows = [r for r in result["per_set"] if r["severity"] == k]
        assert summary[f"severity_{k}"]["ece_set_mean"] == pytest.approx(sum(r["ece"] for r in rows) / 3)
        assert summary[f"severity_{k}"]["ece"] <= summary[f"severity_{k}"]["ece_set_mean"] + 1e-12
    for group, sevs in (("all", (1, 2, 4)), ("severity_1-3", (1, 2)), ("severity_4-5", (4,))):
        for key in ("accuracy", "nll", "ece"):
            assert summary[group][key] == pytest.approx(sum(brute[k][key] for k in sevs) / len(sevs), rel=1e-10)
    # equal set sizes: pooled accuracy and NLL are the means over the sets
    assert summary["all"]["accuracy"] == pytest.approx(sum(r["accuracy"] for r in result["per_set"]) / 9)
    assert summary["all"]["nll"] == pytest.approx(sum(r["nll"] for r in result["per_set"]) / 9)
    assert summary["all"]["ece_set_mean"] == pytest.approx(sum(r["ece"] for r in result["per_set"]) / 9)
    assert summary["all"]["ece"] != pytest.approx(summary["all"]["ece_set_mean"])
    assert ece(predict(ens, sets[(0, 1)], ctx).logsumexp(0), sets[(0, 1)].labels) > 0  # the sets are not trivial


def test_stratified_subset_is_proportional_seeded_and_label_determined():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)  # class-ordered, like a folder layout
    idx = stratified_subset(labels, 100, seed=0, salt="grad")
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 100
    assert torch.bincount(labels[idx]).tolist() == [50, 30, 20]
    assert torch.equal(idx, stratified_subset(labels.clone(), 100, seed=0, salt="grad"))  # same labels, same draw
    assert not torch.equal(idx, stratified_subset(labels, 100, seed=1, salt="grad"))
    assert not torch.equal(idx, stratified_subset(labels, 100, seed=0, salt="test"))
    odd = stratified_subset(labels, 7, seed=0, salt="grad")  # 3.5 / 2.1 / 1.4: remainders to the largest fractions
    assert torch.bincount(labels[odd]).tolist() == [4, 2, 1]
    with pytest.raises(ValueError):
        stratified_subset(labels, 1001, seed=0, salt="grad")


def test_gradient_diversity_uses_a_fixed_stratified_sample_shared_by_corrupted_copies():
    ens, ctx = small_setup(grad_samples=40)
    clean = random_set(0, n=400)
    order = clean.labels.argsort(stable=True)
    clean = clean.subset(order)  # class-ordered: the first 40 would all be class 0
    grads = input_gradients(ens, clean, ctx)
    idx = stratified_subset(clean.labels, 40, GRAD_SAMPLE_SEED, "grad")
    assert len(set(clean.labels[idx].tolist())) == CLASSES
    expected = ens.input_gradients(
        ((clean.inputs[idx].float() / 255 - 0.5) / 0.25), clean.labels[idx], create_graph=False
    )[1]
    torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-6)
    # a corrupted copy (same labels, same order) is scored on the same samples
    corrupted = Split(255 - clean.inputs, clean.labels)
    expected_c = ens.input_gradients(
        ((corrupted.inputs[idx].float() / 255 - 0.5) / 0.25), clean.labels[idx], create_graph=False
    )[1]
    torch.testing.assert_close(input_gradients(ens, corrupted, ctx), expected_c, rtol=1e-5, atol=1e-6)
    assert gradient_cosine_distance(grads) > 0
