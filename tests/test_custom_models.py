"""Networks from outside forde, `model.name=PACKAGE.MODULE:CALLABLE` and `model.name=timm:NAME`: what is refused,
what is checked before any data is read, every method training them through `forde train` and through a sweep, the
hand-written second derivatives on them, and attention's math kernel in the pass FoRDE differentiates twice."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import textwrap
import uuid

import pytest
import torch
import torch.nn.functional as F

import forde.setup
import forde.sweep.launch
from conftest import CUDA, needs
from forde.config import ConfigError, MethodConfig, ModelConfig, load_config
from forde.ensemble import build_ensemble
from forde.kernels import projection
from forde.methods.de import DeepEnsemble
from forde.methods.forde import FoRDE
from forde.models import build_model, check_model
from forde.models.derivatives import native_derivatives
from forde.run_dir import CHECKPOINT
from forde.train import train
from sweep_support import launch, load

VIT = "user_models.vit:TinyViT"
TIMM_RESNET = {"name": "timm:resnet10t", "kwargs": {"channels": [4, 8, 8, 8], "stem_width": 4}}
TIMM_VIT = {
    "name": "timm:vit_tiny_patch16_224",
    "kwargs": {"img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 2},
}
METHODS = ["de", "forde", "rde_weight", "rde_function", "rde_feature", "lit", "swag", "node_bnn"]
FEW_DRAWS = ["method.swag_samples=2", "method.node_test_samples=1", "method.node_train_samples=2"]
TIMM = needs("timm")


def overrides(model: dict) -> list[str]:
    kwargs = [f"model.kwargs.{k}={json.dumps(v)}" for k, v in model.get("kwargs", {}).items()]
    return [f"model.name={model['name']}", *kwargs]


def small_run(tmp_path, model: dict, *extra: str, name: str = "run"):
    """Two members, one epoch of two steps on 64 digits, evaluated on 64 test digits."""
    return load_config(
        "quickstart",
        [
            f"run.out_dir={tmp_path}",
            f"run.name={name}",
            "run.progress=false",
            "run.wandb.mode=disabled",
            f"data.root={tmp_path / 'data'}",
            "ensemble_size=2",
            "data.train_subset=64",
            "data.test_subset=64",
            "optim.batch_size=32",
            "optim.epochs=1",
            "eval.corruptions=[none]",
            "eval.grad_samples=16",
            *overrides(model),
            *extra,
        ],
    )


@pytest.fixture
def no_data(monkeypatch):
    """Any attempt to read a dataset fails the test: the model is checked before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was read before the model was checked")

    monkeypatch.setattr(forde.setup, "load_dataset", refuse)
    monkeypatch.setattr(forde.sweep.launch, "prepare_inputs", refuse)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`write(source)` -> the name of a fresh module holding `source`, importable from tmp_path."""
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(source: str) -> str:
        name = f"user_net_{uuid.uuid4().hex[:8]}"
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


# -- what may be named --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["os:system", "subprocess:run", "builtins:eval", "shutil:rmtree", "importlib:import_module", "os.path:join"]
)
def test_the_standard_library_is_refused_before_anything_is_imported(name):
    load_config("quickstart")  # what loading a config imports anyway
    modules = set(sys.modules)
    with pytest.raises(ConfigError, match="part of Python's standard library") as err:
        load_config("quickstart", [f"model.name={name}"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="standard library"):  # the builder refuses it too, whatever the config
        build_model(ModelConfig(name=name), (1, 8, 8), 10)
    assert set(sys.modules) == modules


BAD_NETWORKS = """
    import functools
    from os import system
    from shutil import rmtree
    import torch
    from torch import nn

    class NotANetwork:
        def __init__(self, **kwargs):
            raise AssertionError("called")

    partial_network = functools.partial(nn.Linear, 64)

    def returns_a_tensor(num_classes):
        return torch.zeros(num_classes)

    def refuses_its_arguments(num_classes, depth=1):
        raise ValueError("depth must be positive")

    class TooManyClasses(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.fc = nn.Linear(64, num_classes + 1)

        def forward(self, x):
            return self.fc(x.flatten(1))

    class WrongInputSize(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, num_classes)

        def forward(self, x):
            return self.fc(x.flatten(1))

    class ReturnsATuple(TooManyClasses):
        def forward(self, x):
            return self.fc(x.flatten(1)), None
"""


@pytest.mark.parametrize(
    "attr,message",
    [
        ("rmtree", r"is a function from shutil, not an nn.Module subclass or a Python function defined outside"),
        ("system", r"is a builtin_function_or_method from (posix|nt), not an nn.Module subclass"),
        ("NotANetwork", r"is a type from user_net_\w+, not an nn.Module subclass"),
        ("partial_network", r"is a partial"),
        ("no_such_thing", r"user_net_\w+ has no attribute 'no_such_thing'"),
        ("returns_a_tensor", r"returned a Tensor, not a torch.nn.Module"),
        ("refuses_its_arguments", r"building it with \(num_classes=10\) failed \(ValueError: depth must be positive\)"),
        ("TooManyClasses", r"maps a batch \[2, 1, 8, 8\] of digits inputs to \[2, 11\], not to logits \[2, 10\]"),
        ("ReturnsATuple", r"maps a batch \[2, 1, 8, 8\] of digits inputs to tuple, not to logits"),
        ("WrongInputSize", r"fails on a batch \[2, 1, 8, 8\] of digits inputs \(RuntimeError: mat1 and mat2"),
    ],
)
def test_a_bad_network_is_one_line_before_any_data_is_read(tmp_path, user_module, no_data, attr, message):
    cfg = small_run(tmp_path, {"name": f"{user_module(BAD_NETWORKS)}:{attr}"})
    with pytest.raises(ConfigError, match=message) as err:
        train(cfg)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"model.name = '{cfg.model.name}'")
    assert not (tmp_path / "run").exists()


def test_a_missing_module_or_dependency_names_what_to_install(tmp_path, user_module, no_data):
    with pytest.raises(
        ConfigError,
        match=r"no module 'no_such_models' in the working directory \(.*\) or the "
        r"installed packages; run from the folder that holds no_such_models/vit.py",
    ):
        train(small_run(tmp_path, {"name": "no_such_models.vit:ViT"}))
    broken = user_module("import not_installed_dependency\n")
    with pytest.raises(
        ConfigError,
        match=r"importing user_net_\w+ failed \(ModuleNotFoundError: No module named "
        r"'not_installed_dependency'\); install not_installed_dependency",
    ):
        train(small_run(tmp_path, {"name": f"{broken}:Net"}))


@TIMM
def test_a_missing_timm_model_names_close_ones(tmp_path, no_data):
    with pytest.raises(ConfigError, match=r"timm has no model 'resnet1000'"):
        train(small_run(tmp_path, {"name": "timm:resnet1000"}))


def test_timm_names_need_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as where it is not installed
    with pytest.raises(
        ConfigError,
        match=r"'timm:resnet18': needs timm, which is not installed; pip install "
        r"'forde\[timm\]'",
    ):
        build_model(ModelConfig(name="timm:resnet18"), (3, 32, 32), 10)


def test_kwargs_reach_the_constructor_and_the_data_sets_the_classes(tmp_path):
    cfg = load_config(
        "quickstart", ["model.name=user_models.vit:tiny_vit", "model.kwargs.dim=8", "model.kwargs.depth=1"]
    )
    model = build_model(cfg.model, (1, 8, 8), 7)
    assert model.head.weight.shape == (7, 8) and len(model.blocks) == 1
    with pytest.raises(ConfigError, match="model.kwargs .* sets num_classes, which the dataset sets"):
        load_config("quickstart", [f"model.name={VIT}", "model.kwargs.num_classes=3"])
    with pytest.raises(ConfigError, match="not to the built-in mlp"):
        load_config("quickstart", ["model.kwargs.depth=3"])


@TIMM
def test_timm_models_take_their_input_channels_from_the_data():
    timm_cfg = load_config("quickstart", overrides(TIMM_RESNET))
    assert build_model(timm_cfg.model, (3, 16, 16), 5).conv1[0].in_channels == 3


def test_zero_init_classifier_zeros_the_last_linear_layer_or_says_there_is_none(user_module):
    vit = build_model(ModelConfig(name=VIT, zero_init_classifier=True), (1, 8, 8), 10)
    assert not vit.head.weight.any() and not vit.head.bias.any()
    convolutional = user_module(
        "from torch import nn\n\ndef net(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(1, num_classes, 8), nn.Flatten())\n"
    )
    with pytest.raises(ConfigError, match="zeros the network's last nn.Linear layer, but it has none"):
        build_model(ModelConfig(name=f"{convolutional}:net", zero_init_classifier=True), (1, 8, 8), 10)


def test_a_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    """As under the `forde` console script, whose sys.path holds neither the working directory nor ''."""
    name = f"cwd_net_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\n\ndef net(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    check_model(ModelConfig(name=f"{name}:net"), (1, 8, 8), 10, "digits")


def test_the_check_leaves_the_global_random_state_alone():
    state = torch.get_rng_state()
    check_model(ModelConfig(name=VIT), (1, 8, 8), 10, "digits")
    assert torch.equal(torch.get_rng_state(), state)


# -- training them ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,attention", [(m, "sdpa") for m in METHODS] + [("forde", "mha"), ("lit", "mha")])
def test_every_method_trains_a_user_vit_through_forde_train(tmp_path, method, attention):
    model = {"name": VIT, "kwargs": {"attention": attention}}
    results = train(small_run(tmp_path, model, f"method.name={method}", *FEW_DRAWS))
    assert 0 <= results["test"]["accuracy"] <= 1 and results["summary"]["test/nll"] < 10
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in history[0].items() if k.startswith("train/"))
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["ensemble"]
    assert any(k.endswith("position.weight") for k in state)  # the user's network, trained and saved


@TIMM
@pytest.mark.parametrize(
    "model,method", [(TIMM_RESNET, m) for m in METHODS] + [(TIMM_VIT, m) for m in ("de", "forde", "lit")]
)
def test_every_method_trains_a_timm_model_through_forde_train(tmp_path, model, method):
    results = train(small_run(tmp_path, model, f"method.name={method}", *FEW_DRAWS, name=method))
    assert 0 <= results["test"]["accuracy"] <= 1 and results["summary"]["test/nll"] < 10


@TIMM
def test_a_sweep_trains_a_user_network_and_a_timm_network(tmp_path, monkeypatch):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))
    study = tmp_path / "own_models.yaml"
    study.write_text(
        textwrap.dedent(f"""\
        base: quickstart
        config:
          data: {{val_fraction: 0.2, train_subset: 96}}
          model: {{name: {VIT}}}
          optim: {{epochs: 1, batch_size: 32}}
          eval: {{corruptions: [none], grad_samples: 16}}
        objectives: [{{metric: val/nll, direction: minimize}}]
        sampler: {{name: grid}}
        search_space:
          ensemble_size: 2
          model.name: {{choices: ["{VIT}", "timm:resnet10t"]}}
        grid:
          - {{model.name: ["{VIT}", "timm:resnet10t"]}}
    """)
    )
    assert launch(tmp_path, "--no-wandb", "--trust-code", study=str(study)) == 0  # the file names the networks
    trials = load(tmp_path, "own_models").get_trials()
    assert sorted(t.params["model.name"] for t in trials) == sorted([VIT, "timm:resnet10t"])
    assert all(t.state.name == "COMPLETE" for t in trials)


@pytest.mark.parametrize(
    "body,message",
    [
        (
            "config: {model: {name: " + VIT + ", kwargs: {attention: flash}}}\n",
            rf"config: model.name = '{VIT}': building it with .*attention='flash'.* failed \(ValueError",
        ),
        (
            "config: {model: {name: " + VIT + "}}\nsearch_space:\n  model.kwargs.heads: {choices: [2, 3]}\n",
            rf"search_space.model.kwargs.heads=3: model.name = '{VIT}' fails on a batch \[2, 1, 8, 8\] of digits inputs",
        ),
    ],
)
def test_a_study_with_a_bad_network_fails_before_its_inputs_are_prepared(tmp_path, capsys, no_data, body, message):
    study = tmp_path / "bad.yaml"
    study.write_text("base: quickstart\nn_trials: 2\nobjectives: [{metric: test/nll, direction: minimize}]\n" + body)
    assert launch(tmp_path, "--trust-code", study=str(study)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


# -- the hand-written second derivatives on them ------------------------------------------------------------------


def graph_nodes(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(TIMM_RESNET, marks=TIMM),
        {"name": VIT},
        {"name": VIT, "kwargs": {"attention": "mha"}},
        pytest.param(TIMM_VIT, marks=TIMM),
    ],
    ids=["timm resnet10t", "vit", "vit, nn.MultiheadAttention", "timm vit"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forde_step_matches_pytorch_derivatives(model, dtype, mode, ieee_float32):
    """A whole FoRDE loss and every parameter gradient, the hand-written derivatives (where the network's batch norm
    and convolutions take them) against PyTorch's; in eval mode batch norm is PyTorch's own in both."""
    cfg = ModelConfig(name=model["name"], kwargs=model.get("kwargs", {}))
    shape = (1, 8, 8)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, *shape, generator=g, dtype=dtype), torch.randint(0, 5, (6,), generator=g)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    method = FoRDE(MethodConfig(alpha=0.5), projection(q, torch.rand(64, generator=g, dtype=torch.float64) + 0.5, 0.5))
    results = []
    for native in (False, True):
        ens = build_ensemble(cfg, 3, shape, 5, seed=0).to(dtype)
        ens.train(mode == "train")
        with native_derivatives() if native else contextlib.nullcontext():
            loss, _, _ = method.loss(ens, x, y)
        nodes = graph_nodes(loss)
        assert ("_ConvTrainBackward" in nodes) != native
        batch_norm = "resnet" in cfg.name
        assert ("_BatchNormTrainBackward" in nodes) == (batch_norm and mode == "train" and not native)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in ens.parameters()]))
    (loss_fast, grads_fast), (loss_native, grads_native) = results
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-4, 1e-6)
    torch.testing.assert_close(loss_fast, loss_native, rtol=rtol, atol=atol)
    for got, want in zip(grads_fast, grads_native):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * 10 + rtol * want.abs().max().item())


# -- attention in the pass that is differentiated twice -----------------------------------------------------------


def sdpa_backends() -> tuple[bool, bool, bool, bool]:
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled()


@pytest.fixture
def sdpa_calls(monkeypatch) -> list:
    """The backends enabled at each call of F.scaled_dot_product_attention (nn.MultiheadAttention's included)."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append(sdpa_backends())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


MATH_ONLY = (False, False, False, True)


@pytest.mark.parametrize("attention", ["sdpa", "mha"])
def test_forde_runs_attention_on_the_math_kernel_and_plain_steps_do_not(attention, sdpa_calls):
    """Fused attention kernels have no second derivative (flash attention on the CPU, flash and memory-efficient on
    CUDA): the FoRDE pass selects the math kernel, only for that pass."""
    ens = build_ensemble(ModelConfig(name=VIT, kwargs={"attention": attention}), 2, (1, 8, 8), 10, seed=0).train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    default = sdpa_backends()
    assert default != MATH_ONLY
    DeepEnsemble().loss(ens, x, y)[0].backward()
    assert sdpa_calls and set(sdpa_calls) == {default}
    sdpa_calls.clear()
    loss, _, _ = FoRDE(MethodConfig(alpha=0.0), None).loss(ens, x, y)
    assert sdpa_calls and set(sdpa_calls) == {MATH_ONLY}
    assert sdpa_backends() == default
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ens.parameters())


@CUDA
@pytest.mark.parametrize("autocast", [False, True])
def test_forde_differentiates_attention_twice_on_cuda(autocast, sdpa_calls):
    """On CUDA the fused kernels (memory-efficient attention for float32, flash for bf16) cannot be differentiated
    twice; FoRDE's step runs and gives PyTorch's math-kernel gradients."""
    x, y = torch.randn(8, 1, 8, 8, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    context = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    ens = build_ensemble(ModelConfig(name=VIT), 2, (1, 8, 8), 10, seed=0).cuda().train()
    with context():
        logits = ens.members[0](x.requires_grad_(True))
        (gx,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        gx.square().sum().backward()
    x = x.detach()
    with context():
        loss, _, _ = FoRDE(MethodConfig(alpha=0.0), None).loss(ens, x, y)
    assert set(sdpa_calls[-2:]) == {MATH_ONLY}
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ens.parameters())
