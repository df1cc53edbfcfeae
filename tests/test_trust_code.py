"""Code named by a file from elsewhere (a run directory's config.yaml, a config YAML, a study file) runs only with
`--trust-code`: `model.name=PACKAGE.MODULE:CALLABLE`, or a timm model given model.kwargs. A network named on the
command line is the user's own consent; the built-in networks and timm's architectures without arguments run none."""

from __future__ import annotations

import argparse
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

import forde.sweep.slurm as slurm
from forde.cli import main
from forde.config import ConfigError, load_config
from forde.sweep.options import parse_args, worker_argv
from sweep_support import STUDIES, launch

SMALL = [
    "run.progress=false",
    "run.wandb.mode=disabled",
    "ensemble_size=2",
    "data.train_subset=64",
    "data.test_subset=64",
    "optim.batch_size=32",
    "optim.epochs=1",
    "eval.corruptions=[none]",
    "eval.grad_samples=0",
]
NET = "from torch import nn\n\ndef net(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
# torch.hub:load is a Python function outside the standard library: named by a file, it imports and runs the
# hubconf.py of a folder the file chooses.
HUBCONF = """\
    import pathlib
    from torch import nn

    def build(num_classes):
        (pathlib.Path(__file__).parent / "MARKER").write_text("ran")
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
"""


@pytest.fixture
def user_net(tmp_path, monkeypatch) -> str:
    """`MODULE:net`, a network of the user's own, importable from a fresh module."""
    folder = tmp_path / "modules"
    folder.mkdir()
    module = f"own_net_{uuid.uuid4().hex[:8]}"
    (folder / f"{module}.py").write_text(NET)
    monkeypatch.syspath_prepend(str(folder))
    return f"{module}:net"


def write_config(path: Path, model: dict) -> Path:
    path.write_text(yaml.safe_dump({"data": {"name": "digits"}, "model": model}))
    return path


def test_a_network_named_by_a_config_file_needs_consent(tmp_path, user_net):
    named = write_config(tmp_path / "own.yaml", {"name": user_net})
    with pytest.raises(ConfigError) as err:
        load_config(named)
    assert str(err.value) == (
        f"{named}: model.name '{user_net}' names code to run; pass --trust-code if you trust this file"
    )
    assert load_config(named, trust_code=True).model.name == user_net
    assert load_config("quickstart", [f"model.name={user_net}"]).model.name == user_net  # typed: the user's own
    assert load_config(named, [f"model.name={user_net}"]).model.name == user_net
    with_kwargs = write_config(tmp_path / "kwargs.yaml", {"name": "mlp", "kwargs": {"hidden": 3}})
    with pytest.raises(ConfigError, match=r"model.kwargs \{'hidden': 3\} are arguments of the code .* --trust-code"):
        load_config(with_kwargs, [f"model.name={user_net}"])  # the file chose the arguments
    assert load_config(with_kwargs, [f"model.name={user_net}", "model.kwargs.hidden=3"]).model.kwargs == {"hidden": 3}


def test_timm_needs_consent_only_when_a_file_gives_it_arguments(tmp_path):
    plain = write_config(tmp_path / "plain.yaml", {"name": "timm:resnet10t"})
    assert load_config(plain).model.name == "timm:resnet10t"  # one of timm's architectures, built as registered
    overlay = write_config(
        tmp_path / "overlay.yaml", {"name": "timm:resnet10t", "kwargs": {"checkpoint_path": "/elsewhere/x.pth"}}
    )
    with pytest.raises(ConfigError, match=rf"^{overlay}: model.kwargs .*checkpoint_path.* --trust-code if you trust"):
        load_config(overlay)
    assert load_config(overlay, trust_code=True).model.kwargs == {"checkpoint_path": "/elsewhere/x.pth"}
    assert load_config(plain, ["model.kwargs.checkpoint_path=x.pth"])  # typed: the user's own arguments
    for name in ("quickstart", "cifar10"):  # the built-in configs and networks never need it
        load_config(name)


def test_a_run_directory_that_names_code_is_refused_until_trusted(tmp_path, user_net, capsys):
    run = tmp_path / "run"
    train = ["train", "quickstart", f"run.out_dir={tmp_path}", "run.name=run", f"data.root={tmp_path / 'data'}"]
    assert main([*train, *SMALL, f"model.name={user_net}"]) == 0  # typed on the command line: no flag needed
    (run / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"].update(name="torch.hub:load", kwargs={"repo_or_dir": str(run), "model": "build", "source": "local"})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()

    refused = f"{run}/config.yaml: model.name 'torch.hub:load' names code to run; pass --trust-code if you trust"
    for command in (["eval", str(run)], ["train", str(run / "config.yaml")]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and refused in err, err
        assert not (run / "MARKER").exists()
    assert main(["eval", str(run), "--trust-code", "--out", "trusted.json"]) == 0
    assert (run / "MARKER").exists() and (run / "trusted.json").exists()  # consent given: its code ran


def own_model_study(path: Path, user_net: str) -> Path:
    path.write_text(
        textwrap.dedent(f"""\
        base: quickstart
        config:
          model: {{name: "{user_net}"}}
          data: {{train_subset: 64, test_subset: 64}}
          optim: {{epochs: 1, batch_size: 32}}
          eval: {{corruptions: [none], grad_samples: 0}}
        n_trials: 1
        objectives: [{{metric: test/nll, direction: minimize}}]
        search_space:
          ensemble_size: 2
    """)
    )
    return path


def test_a_study_that_names_code_runs_only_with_trust_code(tmp_path, user_net, capsys, monkeypatch):
    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))
    study = own_model_study(tmp_path / "own.yaml", user_net)
    assert launch(tmp_path, "--no-wandb", study=str(study)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{study}: model.name '{user_net}' names code to run; pass --trust-code if you trust this file" in err
    assert not (tmp_path / "studies" / "own").exists()  # refused before anything was prepared or built
    assert launch(tmp_path, "--no-wandb", "--trust-code", study=str(study)) == 0


def test_trust_code_reaches_the_workers_and_slurm_jobs(tmp_path, user_net, monkeypatch):
    study = own_model_study(tmp_path / "own.yaml", user_net)
    args = parse_args(["--study", str(study), "--trust-code", "--slurm", "partition=p"], STUDIES)
    args.study_file = study
    argv = worker_argv(args, "sqlite:///x.db")
    assert "--trust-code" in argv and parse_args(argv, STUDIES).trust_code

    submitted: list = []

    class Executor:  # what submit_workers hands to Slurm, captured instead of submitted
        def __init__(self, **kwargs):
            pass

        def update_parameters(self, **kwargs):
            pass

        def map_array(self, worker, tasks):
            submitted.append(worker)
            raise slurm.FailedJobError("captured")

    monkeypatch.setattr(slurm.submitit, "SlurmExecutor", Executor)
    storage = argparse.Namespace(url="sqlite:///x.db", display="x.db")
    spec = slurm.parse_spec("partition=p,time=10")
    assert slurm.submit_workers(args, spec, "own", tmp_path / "own", storage) == 2
    (worker,) = submitted
    assert "--trust-code" in worker.argv and worker.trust_code
