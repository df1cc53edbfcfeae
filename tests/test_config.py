"""Bad configs fail before training, with a message that names the field and the fix."""

import subprocess
import sys

import pytest
import torch

from forde.cli import main
from forde.config import DEVICE_DEFAULTS, ConfigError, builtin_config_names, load_config
from forde.device import resolve_settings


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.alpah=0.4", r"unknown config key 'method.alpah'; did you mean 'method.alpha'"),
        ("ensemble_size=-2", r"ensemble_size = -2: must be at least 1"),
        ("method.alpha=1.5", r"method.alpha = 1.5: must lie in \[0, 1\]"),
        ("method.alpha=-0.1", r"method.alpha = -0.1"),
        ("optim.lr=fast", r"bad value for 'optim.lr'.*; e.g. optim.lr=0.1$"),
        ("optim.epochs", r"^override 'optim.epochs' has no value; write it as optim.epochs=VALUE$"),
        ("model.name=vgg", r"model.name = 'vgg': is none of mlp, resnet18, .* timm:NAME or PACKAGE.MODULE:CALLABLE"),
        ("method.grad_target=loss", r"method.grad_target"),
        ("eval.corruptions=[fog,rain]", r"unknown corruption\(s\) \['rain'\]"),
        ("eval.severities=[0]", r"eval.severities"),
        ("ensemble_size=1", r"needs at least 2 members"),
        ("optim.decay_start=0.95", r"decay_start"),
        ("data.val_fraction=1.0", r"data.val_fraction"),
        ("data.test_subset=-5", r"data.test_subset = -5: must be a positive sample count or null"),
        ("model.blocks=[2,0,2,2]", r"model.blocks = \[2, 0, 2, 2\]: needs at least one stage"),
        ("model.blocks=[1,1,1,1]", r"sets the depth of resnet18 and preact_resnet18 only, not of model.name = mlp"),
        ("method.alpha_mix=covariance", r"bad value for 'method.alpha_mix'"),
        ("method.repulsion_ramp_start=0", r"method.repulsion_ramp_start = 0.0: must be positive"),
        ("method.median=all", r"bad value for 'method.median'"),
        ("run.wandb.init_timeout=0", r"run.wandb.init_timeout = 0.0: must be positive"),
        ("precision=fp16", r"bad value for 'precision'"),
        ("model.execution=jit", r"bad value for 'model.execution'"),
        ("optim.lr=inf", r"optim.lr = inf: must be a finite number; set optim.lr=0.1"),
        ("optim.lr=1e309", r"optim.lr = inf: must be a finite number"),
        ("method.alpha=nan", r"method.alpha = nan: must be a finite number"),
        ("eval.ood=[gaussian_noise", r"override 'eval.ood=\[gaussian_noise': its value is not valid YAML"),
        ("eval.ood={a: 1}", r"override 'eval.ood=\{a: 1\}' is of the wrong kind.*key=\[a,b\]"),
        ("eval.ood=gaussian_noise", r"'eval.ood' must be a list, e.g. eval.ood=\[gaussian_noise,uniform_noise\]"),
        ("eval.ood=null", r"'eval.ood' must be a list"),
        ("method.swag_rank=1", r"method.swag_rank = 1: must be 0 \(diagonal covariance\) or at least 2"),
        ("method.node_components=0", r"method.node_components = 0: must be at least 1; set method.node_components=4"),
        ("method.feature_projection_dim=0", r"method.feature_projection_dim = 0: must be at least 1"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", [override])


def test_per_member_temperatures_need_temperature_scaling_on():
    with pytest.raises(ConfigError, match=r"eval.calibrate_members = True: .* set eval.calibrate=null"):
        load_config("quickstart", ["eval.calibrate=false", "eval.calibrate_members=true"])


def test_fixed_bandwidth_allows_a_single_member_and_de_needs_no_bandwidth():
    assert load_config("quickstart", ["ensemble_size=1", "method.bandwidth=0.5"]).ensemble_size == 1
    assert load_config("quickstart", ["ensemble_size=1", "method.name=de"]).method.name == "de"


def test_unknown_config_name_lists_builtins(tmp_path):
    with pytest.raises(ConfigError, match="built-in"):
        load_config("no_such_config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match="optim.lrr.*optim.lr"):
        load_config(bad)


def test_builtin_configs_all_validate():
    names = builtin_config_names()
    assert "quickstart" in names
    for name in names:
        load_config(name)


def test_cli_reports_config_errors_before_training(tmp_path, capsys):
    code = main(["train", "quickstart", "method.alpha=7", f"run.out_dir={tmp_path}"])
    assert code == 2
    assert "method.alpha = 7.0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_the_place(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n epochs: 3\n")
    assert main(["train", str(bad), f"run.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{bad}: YAML syntax error at line 3, column 2: " in err and "fix that line" in err


def test_console_script_prints_resolved_config():
    out = subprocess.run(
        [sys.executable, "-m", "forde.cli", "config", "quickstart", "method.alpha=0.2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "alpha: 0.2" in out and "ensemble_size: 5" in out


def test_auto_settings_take_the_device_defaults_and_explicit_values_win():
    auto = resolve_settings(load_config("quickstart", ["device=cpu"]))
    assert {k: getattr(auto, k) for k in DEVICE_DEFAULTS["cpu"]} == DEVICE_DEFAULTS["cpu"]
    assert not (auto.tf32 or auto.cudnn_benchmark or auto.graphs)  # CUDA switches mean nothing on the CPU
    chosen = resolve_settings(load_config("quickstart", ["device=cpu", "channels_last=true", "model.execution=vmap"]))
    assert chosen.channels_last and chosen.execution == "vmap"


@pytest.mark.parametrize(
    "override,message",
    [("precision=bf16", "bf16 autocast is for CUDA"), ("cuda.graphs=true", "CUDA graphs need a CUDA device")],
)
def test_cuda_only_settings_on_the_cpu_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", ["device=cpu", override])
    if not torch.cuda.is_available():  # device=auto resolves to the CPU here: refused when the run is built
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            resolve_settings(load_config("quickstart", [override]))


def test_an_ensemble_larger_than_memory_is_one_line_before_anything_is_built(tmp_path):
    from forde.setup import build

    with pytest.raises(
        ConfigError, match=r"ensemble_size = 10000000: 10000000 members of 26,634 parameters need about"
    ):
        build(load_config("quickstart", ["ensemble_size=10000000", f"data.root={tmp_path}"]))
