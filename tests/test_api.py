"""The Python API (`import forde`): its losses are the training loop's, its PCA projection the pipeline's, its
metrics the evaluation's; the losses take any nn.Module members; the examples run."""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import forde
from conftest import devices, needs
from forde.config import MethodConfig, load_config
from forde.data.base import Split
from forde.data.corrupted import CorruptedSet
from forde.data.pipeline import normalize
from forde.evaluate import EvalContext, evaluate_corrupted, evaluate_split
from forde.methods import build_method
from forde.setup import build
from forde.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
LOSSES = {
    "de": forde.DeepEnsembleLoss,
    "forde": forde.FoRDELoss,
    "rde_weight": forde.WeightRDELoss,
    "rde_function": forde.FunctionRDELoss,
    "lit": forde.LITLoss,
}


def digits_config(tmp_path, *overrides):
    return load_config(
        "quickstart",
        [
            f"data.root={tmp_path / 'data'}",
            f"run.out_dir={tmp_path}",
            "run.progress=false",
            "ensemble_size=3",
            "model.hidden=[32]",
            "eval.corruptions=[none]",
            *overrides,
        ],
    )


def api_loss(m: MethodConfig, projection: torch.Tensor | None) -> forde.EnsembleLoss:
    """The API's loss for a config's method: every keyword named as the config's `method.*` key."""
    cls = LOSSES[m.name]
    settings = {k: getattr(m, k) for k in inspect.signature(cls).parameters if hasattr(m, k)}
    return cls(projection, **settings) if cls is forde.FoRDELoss else cls(**settings)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.alpha=1.0"],
        ["method.alpha=0.4", "method.alpha_mix=lengthscale", "method.median=all_pairs", "method.bandwidth_scale=0.5"],
        ["method.alpha=0.0", "method.grad_target=log_prob"],
        ["method.name=de"],
        ["method.name=rde_weight", "method.bandwidth_scale=2.0"],
        ["method.name=rde_function", "method.bandwidth=0.5"],
        ["method.name=lit", "method.lit_weight=0.3"],
    ],
    ids=lambda o: " ".join(o),
)
def test_the_api_loss_is_the_training_loops(tmp_path, overrides):
    """Same members, the training loop's first batch, the projection from the training inputs: the same loss,
    outputs, statistics and parameter gradients as `forde train`'s step, to the bit."""
    cfg = digits_config(tmp_path, *overrides)
    setup = build(cfg)
    trainer = Trainer(setup, tmp_path / "run")
    x, y = next(iter(trainer.loader))
    loop = trainer.step(x, y, step=0, epoch=0.0)
    loop_grads = [p.grad.clone() for p in setup.ensemble.parameters()]

    ds, m = setup.dataset, cfg.method
    projection = forde.pca_projection(ds.train.inputs, m.alpha, m.alpha_mix, mean=ds.mean, std=ds.std)
    out = api_loss(m, projection)(list(setup.ensemble.members), x, y)  # plain modules, not the Ensemble
    setup.ensemble.zero_grad(set_to_none=True)
    out.loss.backward()

    assert isinstance(out, forde.LossOutput)
    assert torch.equal(out.loss.detach(), loop.loss) and torch.equal(out.outputs.detach(), loop.outputs)
    assert out.stats.keys() == loop.stats.keys()
    assert all(torch.equal(out.stats[k], loop.stats[k]) for k in out.stats)
    for p, g in zip(setup.ensemble.parameters(), loop_grads):
        assert torch.equal(p.grad, g)
    assert any(g.abs().sum() > 0 for g in loop_grads)


@pytest.mark.parametrize("alpha,mix", [(1.0, "precision"), (0.3, "lengthscale")])
def test_pca_projection_from_inputs_is_the_pipelines(tmp_path, alpha, mix):
    """From the uint8 training images: the projection `forde train` uses, exactly. From the normalised float
    inputs (what a user's loader yields), as a tensor, a Dataset or a DataLoader: the same metric P P^T (P itself
    is unique only up to the signs and the basis of repeated eigenvalues; the kernel sees only P P^T)."""
    cfg = digits_config(tmp_path, f"method.alpha={alpha}", f"method.alpha_mix={mix}")
    setup = build(cfg)
    pipeline = build_method(cfg, setup.dataset, torch.device("cpu")).projection
    ds = setup.dataset
    assert torch.equal(forde.pca_projection(ds.train.inputs, alpha, mix, mean=ds.mean, std=ds.std), pipeline)

    x = normalize(ds.train.inputs, torch.tensor(ds.mean), torch.tensor(ds.std))
    pca = forde.input_pca(x)
    data = TensorDataset(x, ds.train.labels)
    stream = type("Stream", (torch.utils.data.IterableDataset,), {"__iter__": lambda self: iter(data)})()
    for source in (x, data, stream, DataLoader(data, batch_size=100), pca):
        p = forde.pca_projection(source, alpha, mix)
        assert p.dtype == torch.float32 and p.shape == pipeline.shape
        torch.testing.assert_close(p @ p.T, pipeline @ pipeline.T, rtol=1e-4, atol=1e-5)
    assert forde.pca_projection(x, 0.0) is None  # the identity kernel


@pytest.mark.parametrize("device", devices())
def test_a_float32_cpu_projection_follows_the_gradients_device_and_dtype(device):
    """pca_projection returns float32 on the CPU; members in float64 on `device` get the kernel in float64 there,
    as if the projection had been passed on that device in that dtype."""
    torch.manual_seed(0)
    members = [mlp(3).double().to(device) for _ in range(3)]
    x, y = torch.randn(6, 1, 6, 6, dtype=torch.float64, device=device), torch.randint(0, 3, (6,), device=device)
    projection = forde.pca_projection(torch.randn(80, 1, 6, 6), alpha=0.5)
    moved = forde.FoRDELoss(projection.to(device, torch.float64))(members, x, y)
    assert projection.device.type == "cpu" and projection.dtype == torch.float32
    torch.testing.assert_close(forde.FoRDELoss(projection)(members, x, y).loss, moved.loss, rtol=0, atol=0)


class ConvGELU(nn.Module):
    """A member unlike the project's networks: torch.nn convolution, GELU and LayerNorm over pixel tokens.
    (Attention is left out: PyTorch's fused attention kernels have no second derivative, on the CPU too.)"""

    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        tokens = nn.functional.gelu(self.conv(x)).flatten(2).transpose(1, 2)  # [B, H*W, 8]
        return self.head(self.norm(tokens).mean(1))


def mlp(classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, classes))


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_trains_arbitrary_members(name):
    """Members of any architecture (mixed, where the method allows it), as a list, a ModuleList or an Ensemble:
    the loss backpropagates into every member, and the repulsive methods change the gradients of plain DE."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    members = [ConvGELU(3), ConvGELU(3), ConvGELU(3)] if name == "rde_weight" else [ConvGELU(3), mlp(3), ConvGELU(3)]
    loss_fn = forde.FoRDELoss(forde.pca_projection(torch.randn(50, 1, 6, 6))) if name == "forde" else LOSSES[name]()
    results = []
    for wrapped in (members, nn.ModuleList(members), forde.Ensemble(members)):
        out = loss_fn(wrapped, x, y)
        for m in members:
            m.zero_grad(set_to_none=True)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for m in members for p in m.parameters()]))
        assert out.outputs.shape == (3, 8, 3) and math.isfinite(out.loss.item())
        assert "ce" in out.stats and (name == "de") != ("repulsion" in out.stats)
    assert all(torch.equal(r[0], results[0][0]) and all(map(torch.equal, r[1], results[0][1])) for r in results)
    grads = results[0][1]
    assert all(g.abs().sum() > 0 for g in grads)
    if name != "de":
        de = forde.DeepEnsembleLoss()(members, x, y)
        for m in members:
            m.zero_grad(set_to_none=True)
        de.loss.backward()
        assert not all(torch.allclose(p.grad, g) for p, g in zip([p for m in members for p in m.parameters()], grads))


def test_regression_members_with_a_gaussian_likelihood():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)) for _ in range(4)]
    x, y = torch.randn(20, 1), torch.randn(20)
    out = forde.FoRDELoss(likelihood=forde.Gaussian(noise_std=0.3))(members, x, y)
    assert out.outputs.shape == (4, 20, 1) and "gaussian_nll" in out.stats and out.loss.requires_grad


def test_metrics_of_your_own_predictions_are_the_evaluations():
    """Predictions and gradients computed in user code, given to forde.metrics, give the numbers that
    `forde train`'s evaluation gives for the same sets (clean, and each severity's corrupted sets pooled)."""
    torch.manual_seed(0)
    ens = forde.Ensemble([mlp(4) for _ in range(3)])
    ctx = EvalContext(torch.device("cpu"), (0.5,), (0.25,), batch_size=64, grad_samples=1000)
    g = torch.Generator().manual_seed(1)
    sets = {
        (c, k): Split(
            torch.randint(0, 256, (90, 1, 6, 6), generator=g, dtype=torch.uint8),
            torch.randint(0, 4, (90,), generator=g),
        )
        for c in range(2)
        for k in (1, 3, 5)
    }

    def mine(split):
        x = (split.inputs.float() / 255 - 0.5) / 0.25
        ens.eval()
        with torch.no_grad():
            log_probs = ens(x).log_softmax(-1)
        return log_probs, ens.input_gradients(x, split.labels, create_graph=False).grads

    def assert_same(row: dict, expected: dict):
        assert row.keys() == expected.keys()
        for k, v in row.items():
            assert v == (expected[k] if isinstance(v, str) else pytest.approx(expected[k], rel=1e-6)), k

    clean = sets[(0, 1)]
    log_probs, grads = mine(clean)
    assert_same(forde.metrics.ensemble_metrics(log_probs, clean.labels, grads), evaluate_split(ens, clean, ctx))

    pipeline = evaluate_corrupted(ens, [CorruptedSet(f"c{c}", k, lambda s=s: s) for (c, k), s in sets.items()], ctx)
    corrupted = forde.metrics.CorruptedMetrics()
    for (c, k), split in sets.items():
        log_probs, grads = mine(split)
        corrupted.add(f"c{c}", k, log_probs, split.labels, grads, source="unknown")
    assert len(corrupted.per_set) == len(pipeline["per_set"]) == 6
    for row, expected in zip(corrupted.per_set, pipeline["per_set"]):
        assert_same(row, expected)
    summary = corrupted.summary()
    assert summary.keys() == pipeline["summary"].keys() and "grad_cosine_distance" in summary["all"]
    for group in summary:
        assert summary[group] == pytest.approx(pipeline["summary"][group], rel=1e-6)


def documented_attributes(cls) -> list[str]:
    """The names listed under `Attributes:` in a class's docstring."""
    section = inspect.getdoc(cls).split("Attributes:")[1]
    return re.findall(r"^    (\w+):", section, flags=re.M)


def test_named_return_types_are_what_their_docstrings_say():
    assert documented_attributes(forde.LossOutput) == list(forde.LossOutput._fields) == ["loss", "outputs", "stats"]
    assert documented_attributes(forde.InputGradients) == list(forde.InputGradients._fields) == ["outputs", "grads"]
    assert documented_attributes(forde.PCA) == [f.name for f in __import__("dataclasses").fields(forde.PCA)]
    members = [mlp(3), mlp(3)]
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
    loss, outputs, stats = forde.FoRDELoss()(members, x, y)  # still a tuple for unpacking callers
    gradients = forde.Ensemble(members).input_gradients(x, y, create_graph=False)
    assert isinstance(gradients, forde.InputGradients) and gradients.grads.shape == (2, 5, 36)
    pca = forde.input_pca(torch.randn(40, 1, 6, 6))
    assert pca.eigenvalues.shape == (36,) and pca.eigenvectors.shape == (36, 36)
    assert bool((pca.eigenvalues[:-1] >= pca.eigenvalues[1:]).all())


def test_loss_settings_default_to_the_configs():
    """A loss built without settings is the method `forde train` runs with the config's defaults."""
    defaults = MethodConfig()
    for cls in LOSSES.values():
        for name, p in inspect.signature(cls).parameters.items():
            if hasattr(defaults, name):
                assert p.default == getattr(defaults, name), (cls.__name__, name)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: forde.FoRDELoss(bandwidth_scale=0.0), "bandwidth_scale = 0.0: must be positive"),
        (lambda: forde.FoRDELoss(median="mean"), "median = 'mean': must be one of"),
        (lambda: forde.LITLoss(lit_weight=-1.0), "lit_weight = -1.0: must be non-negative"),
        (lambda: forde.FoRDELoss(torch.ones(3)), "projection: expected a float [D, D] matrix"),
        (
            lambda: forde.FoRDELoss()([mlp(3)], torch.randn(4, 1, 6, 6), torch.zeros(4, dtype=torch.long)),
            "at least 2 members",
        ),
        (
            lambda: forde.FoRDELoss(torch.eye(10))(
                [mlp(3)] * 2, torch.randn(4, 1, 6, 6), torch.zeros(4, dtype=torch.long)
            ),
            "projection is [10, 10] but the inputs have 36 features",
        ),
        (
            lambda: forde.WeightRDELoss()(
                [mlp(3), ConvGELU(3)], torch.randn(4, 1, 6, 6), torch.zeros(4, dtype=torch.long)
            ),
            "the same architecture",
        ),
        (
            lambda: forde.DeepEnsembleLoss()(mlp(3), torch.randn(4, 1, 6, 6), torch.zeros(4, dtype=torch.long)),
            "pass a list of the M member networks",
        ),
        (
            lambda: forde.pca_projection(torch.zeros(9, 1, 6, 6, dtype=torch.uint8)),
            "pass images [N, C, H, W] with mean=",
        ),
        (lambda: forde.pca_projection(torch.randn(9, 36), mean=(0.5,), std=(0.2,)), "float inputs are used as given"),
        (lambda: forde.pca_projection(torch.randn(9, 36), alpha=1.5), "alpha = 1.5: must lie in [0, 1]"),
        (lambda: forde.pca_projection(torch.randn(9, 36), mix="both"), "mix = 'both'"),
        (lambda: forde.pca_projection(torch.randn(3, 40000)), "use the identity kernel"),
        (lambda: forde.pca_projection([{"image": torch.zeros(3)}]), "expected a tensor, a dataset of samples"),
    ],
)
def test_bad_input_is_one_line_naming_it(call, message):
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_import_forde_is_light_and_every_public_name_resolves():
    """`import forde` loads no torch (the CLI starts fast); each name in `forde.__all__` imports on first use."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", "import sys, forde; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.stdout.strip() == "False", done.stderr
    assert all(getattr(forde, name) is not None for name in forde.__all__)
    typed = ast.parse((ROOT / "src" / "forde" / "__init__.py").read_text())  # what type checkers and docs see
    imported = {a.asname or a.name for node in ast.walk(typed) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert imported - {"TYPE_CHECKING", "Any", "annotations"} == set(forde.__all__)
    with pytest.raises(AttributeError):
        forde.no_such_name  # noqa: B018 (the attribute access is what raises)


@pytest.mark.parametrize("script", ["pytorch_loop.py", pytest.param("lightning_module.py", marks=needs("lightning"))])
def test_example_runs_a_few_steps(tmp_path, script):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    keys = {k.removeprefix("val/") for k in metrics}
    assert {"accuracy", "nll", "ece", "epistemic"} <= keys
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert list(tmp_path.iterdir()) == []  # nothing written beside the caller


def test_the_python_blocks_of_docs_api_md_run():
    """Every ```python block of docs/api.md, in order, in one namespace that provides the names it leaves to you."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    ensemble = forde.Ensemble([mlp(3) for _ in range(3)])
    with torch.no_grad():
        corrupted_sets = [(f"c{c}", k, ensemble(x).log_softmax(-1), y) for c in range(2) for k in (1, 2)]
    namespace = {
        "MyNet": lambda: mlp(3),
        "train_x": x,
        "train_loader": DataLoader(TensorDataset(x, y), batch_size=16),
        "ensemble": ensemble,
        "x_test": x,
        "y_test": y,
        "my_corrupted_sets": corrupted_sets,
    }
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    assert isinstance(namespace["out"], forde.LossOutput) and set(namespace["projections"]) == {0.1, 0.4, 1.0}
