"""Model shapes, the ensemble's input gradients against a per-member loop, and checkpoints of older networks."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from forde.config import MethodConfig, ModelConfig, load_config
from forde.ensemble import build_ensemble
from forde.methods.forde import FoRDE
from forde.models import build_model
from forde.run_dir import load_checkpoint
from forde.run_evaluation import evaluate_run


@pytest.mark.parametrize(
    "name,shape,width",
    [
        ("resnet18", (3, 32, 32), 8),
        ("preact_resnet18", (3, 64, 64), 8),
        ("wrn16_4", (3, 32, 32), 16),
        ("mlp", (1, 8, 8), 64),
    ],
)
def test_models_map_images_to_logits(name, shape, width):
    model = build_model(ModelConfig(name=name, width=width, hidden=[16]), shape, 7)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_paper_sized_resnet18_has_the_usual_parameter_count():
    n = sum(p.numel() for p in build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10).parameters())
    assert 11_100_000 < n < 11_200_000  # ResNet18 for CIFAR-10: ~11.17M


def test_wrn16_4_has_the_usual_parameter_count():
    n = sum(p.numel() for p in build_model(ModelConfig(name="wrn16_4"), (3, 32, 32), 10).parameters())
    assert 2_700_000 < n < 2_800_000  # WRN-16-4: ~2.75M


def test_members_are_independent_draws_reproducible_from_one_seed():
    cfg = ModelConfig(name="mlp", hidden=[8])
    a = build_ensemble(cfg, 3, (4,), 2, seed=5)
    b = build_ensemble(cfg, 3, (4,), 2, seed=5)
    w = [m.net[1].weight for m in a.members]
    assert not torch.equal(w[0], w[1])
    assert all(torch.equal(x, y.net[1].weight) for x, y in zip(w, b.members))


@pytest.mark.parametrize("target", ["logit", "log_prob"])
def test_input_gradients_match_a_per_member_loop(target):
    ens = build_ensemble(ModelConfig(name="resnet18", width=4), 3, (3, 8, 8), 5, seed=0).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 4, 2, 2])
    logits, grads = ens.input_gradients(x, y, target)
    assert logits.shape == (3, 4, 5) and grads.shape == (3, 4, 3 * 8 * 8) and grads.requires_grad
    for i, member in enumerate(ens.members):
        xi = x.clone().requires_grad_(True)
        out = member(xi)
        out = out.log_softmax(-1) if target == "log_prob" else out
        (g,) = torch.autograd.grad(out.gather(1, y[:, None]).sum(), xi)
        torch.testing.assert_close(grads[i], g.flatten(1), rtol=1e-5, atol=1e-6)


def test_blocks_set_the_depth_of_the_residual_networks():
    """[1, 1, 1, 1] is ResNet10: one basic block per stage, ~4.9M parameters at width 64 (ResNet18: ~11.17M)."""
    resnet10 = build_model(ModelConfig(name="resnet18", blocks=[1, 1, 1, 1]), (3, 32, 32), 10)
    assert 4_850_000 < sum(p.numel() for p in resnet10.parameters()) < 4_950_000
    assert len(resnet10.layers) == 4 and resnet10(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    preact = build_model(ModelConfig(name="preact_resnet18", width=8, blocks=[1, 2]), (3, 64, 64), 5)
    assert len(preact.layers) == 3 and preact(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize(
    "name,shape",
    [("resnet18", (3, 32, 32)), ("preact_resnet18", (3, 32, 32)), ("wrn16_4", (3, 32, 32)), ("mlp", (1, 8, 8))],
)
def test_zero_init_classifier_starts_every_model_at_zero_logits(name, shape):
    cfg = ModelConfig(name=name, width=8, hidden=[16], zero_init_classifier=True)
    ens = build_ensemble(cfg, 2, shape, 7, seed=0).train()
    x = torch.randn(4, *shape)
    assert torch.equal(ens(x), torch.zeros(2, 4, 7))
    # the features still differ between members, so training separates them
    first = [p for n, p in ens.members[0].named_parameters() if p.dim() > 1][0]
    second = [p for n, p in ens.members[1].named_parameters() if p.dim() > 1][0]
    assert not torch.equal(first, second)
    plain = build_model(ModelConfig(name=name, width=8, hidden=[16]), shape, 7)
    assert plain(x).abs().sum() > 0


OLD_RUN = Path(__file__).parent / "fixtures" / "run_with_old_layer_classes"


def test_a_run_written_with_the_old_layer_classes_loads_into_the_plain_torch_nn_networks(tmp_path):
    """The run directory was written by `forde train` when the ResNets were built from forde's own BatchNorm2d and
    Conv2d classes (ResNet10 of width 2, FoRDE, one epoch on 128 digits), and expected_logits.pt holds what that
    code computed from its checkpoint: the members' eval-mode logits on a fixed batch, loaded and after one FoRDE
    step (SGD, lr 0.1) on it. The torch.nn networks take the same state dict and compute the same numbers, and
    `forde eval` of the directory reproduces its results.json."""
    cfg = load_config(OLD_RUN / "config.yaml")
    state = load_checkpoint(OLD_RUN)
    expected = torch.load(OLD_RUN / "expected_logits.pt", weights_only=True)
    ens = build_ensemble(cfg.model, cfg.ensemble_size, (1, 8, 8), 10, cfg.seed)
    assert not [m for m in ens.modules() if type(m).__module__.startswith("forde.models.") and not list(m.children())]
    ens.load_state_dict(state["ensemble"])  # strict: every parameter and buffer name matches
    x, y = torch.linspace(-2, 2, 256).reshape(4, 1, 8, 8), torch.tensor([0, 3, 7, 9])

    def eval_logits():
        ens.eval()
        with torch.no_grad():
            out = ens(x)
        ens.train()
        return out

    torch.testing.assert_close(eval_logits(), expected["loaded"], rtol=1e-6, atol=1e-6)
    loss, _, _ = FoRDE(MethodConfig(alpha=0.0), None).loss(ens, x, y)
    loss.backward()
    with torch.no_grad():
        for p in ens.parameters():
            p -= 0.1 * p.grad
    torch.testing.assert_close(eval_logits(), expected["after_forde_step"], rtol=1e-5, atol=1e-5)

    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    results = evaluate_run(run, [f"data.root={tmp_path / 'data'}", "run.progress=false"], out_name="again.json")
    old = json.loads((OLD_RUN / "results.json").read_text())
    for key in ("test/accuracy", "test/nll", "test/ece"):
        assert results["summary"][key] == pytest.approx(old["summary"][key], rel=1e-5), key
