"""One ensemble over two processes (gloo, CPU) equals one process: both strategies, every method that runs
distributed, float64, parameters, batch-norm statistics and losses after a few SGD steps with momentum."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import distributed_support as support
from forde import distributed
from forde.config import MethodConfig, TrainConfig
from forde.ensemble import Ensemble
from forde.errors import ConfigError
from forde.sweep import trial_processes

METHODS = [
    "de",
    "forde_per_column",
    "forde_all_pairs",
    "forde_subset",
    "lit",
    "rde_weight",
    "rde_function",
    "rde_feature",  # one classifier shared by every member, on every process
    "node_bnn",  # its own optimizer group, per-member noise and a divergence over all members
]


def run_ranks(out_dir, names: list[str], strategy: str, size: int = 2) -> list[dict]:
    port = distributed.free_port()
    mp.start_processes(
        support.rank_main, args=(size, port, names, strategy, str(out_dir)), nprocs=size, start_method="spawn"
    )
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(size)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, list[dict]]:
    """Each strategy's two ranks, every method trained in turn (one start of the processes per strategy)."""
    return {
        "data": run_ranks(tmp_path_factory.mktemp("data"), METHODS, "data"),
        "members": run_ranks(tmp_path_factory.mktemp("members"), METHODS, "members"),
    }


@pytest.mark.parametrize(
    ("name", "strategy"),
    [(n, s) for n in METHODS for s in distributed.STRATEGIES],
)
def test_two_processes_equal_one(two_processes, name, strategy):
    reference = support.train_steps(name)
    initial = support.train_steps(name, steps=0)["state"]
    assert any(not torch.equal(v, initial[k]) for k, v in reference["state"].items())  # the steps moved the members
    for result in two_processes[strategy]:
        result = result[name]
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-10, abs=1e-12)
        assert result["state"].keys() == reference["state"].keys()
        for key, value in reference["state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)
        assert len(result["momentum"]) == len(reference["momentum"])  # the optimizer, numbered as one process does
        for mine, theirs in zip(result["momentum"], reference["momentum"]):
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_split_sizes():
    assert distributed.split_sizes(10, 3) == [4, 3, 3]
    assert distributed.split_sizes(4, 2) == [2, 2]


def test_a_member_share_of_a_checkpoint_renumbers_every_per_member_list():
    """Rank 1 of 2 resuming a one-process checkpoint of 4 members takes members 2 and 3, their SWAG moments and
    their optimizer entries, numbered from 0 as it holds them."""
    from forde.methods import SWAG

    full = Ensemble([torch.nn.Linear(2, 2) for _ in range(4)])
    SWAG(MethodConfig(name="swag")).attach(full)
    for i, moments in enumerate(full.swag):
        moments.collected.fill_(10 + i)
    optimizer = torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9)
    for i, p in enumerate(full.parameters()):
        optimizer.state[p]["momentum_buffer"] = torch.full_like(p, float(i))
    share = distributed.MemberParallelEnsemble(full, distributed.World(1, 2, 1, "members"))
    layouts = [[[None] * 4], [[None] * 4]]  # each rank: one group, 2 members x (weight, bias)
    ensemble, opt = share.local_states(full.state_dict(), optimizer.state_dict(), layouts)
    assert sorted(ensemble) == sorted(k for k in full.state_dict() if k.split(".")[1] in "01")
    torch.testing.assert_close(ensemble["members.0.weight"], full.members[2].weight.detach())
    assert int(ensemble["swag.1.collected"]) == 13
    assert [float(v["momentum_buffer"].flatten()[0]) for _, v in sorted(opt["state"].items())] == [4, 5, 6, 7]
    assert opt["param_groups"][0]["params"] == [0, 1, 2, 3]


def test_a_shared_layer_and_a_second_optimizer_group_are_numbered_as_one_process_numbers_them():
    """4 members, each its own layer (weight, bias) then one classifier they all share (weight, bias), and one
    noise parameter each in a second group: one process numbers its optimizer 0-9 (the classifier once, in
    member 0) then 10-13. Rank 1 of 2 holds members 2 and 3 and its own copy of the classifier."""
    shared = [None, None, 0, 1, None, None]  # a rank's first member meets the classifier; its second does not
    layouts = [[shared, [None, None]], [shared, [None, None]]]
    numbering = distributed.one_process_numbering(layouts)
    assert numbering[0] == [{i: (i, True) for i in range(6)}, {6: (10, True), 7: (11, True)}]
    assert numbering[1][0] == {0: (6, True), 1: (7, True), 2: (2, False), 3: (3, False), 4: (8, True), 5: (9, True)}
    assert numbering[1][1] == {6: (12, True), 7: (13, True)}

    full = Ensemble([torch.nn.Linear(2, 2) for _ in range(4)])
    full.node_bnn = torch.nn.ModuleList([torch.nn.ParameterList([torch.zeros(3)]) for _ in range(4)])
    state = {i: {"momentum_buffer": torch.tensor(float(i))} for i in range(14)}
    groups = [{"lr": 0.1, "params": list(range(10))}, {"lr": 0.01, "params": list(range(10, 14))}]
    share = distributed.MemberParallelEnsemble(full, distributed.World(1, 2, 1, "members"))
    ensemble, opt = share.local_states(full.state_dict(), {"state": state, "param_groups": groups}, layouts)
    assert sorted(k for k in ensemble if k.startswith("node_bnn")) == ["node_bnn.0.0", "node_bnn.1.0"]
    assert [float(opt["state"][i]["momentum_buffer"]) for i in range(8)] == [6, 7, 2, 3, 8, 9, 12, 13]
    assert [g["params"] for g in opt["param_groups"]] == [[0, 1, 2, 3, 4, 5], [6, 7]]
    assert [g["lr"] for g in opt["param_groups"]] == [0.1, 0.01]


def test_ranks_from_env():
    assert distributed.ranks_from_env({}) is None
    assert distributed.ranks_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    assert distributed.ranks_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    step = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1"}
    assert distributed.ranks_from_env(step) == (3, 4, 1)  # a task of `srun --ntasks 4`
    # the batch script of a 4-task job is one process, not rank 0 of 4 waiting for the others
    assert distributed.ranks_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None


def test_one_line_before_any_process_waits(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT unset"):
        distributed.start("data", "cpu", 10)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError, match="device = 'cuda:1' with 2 processes: each process takes the GPU"):
        distributed.start("data", "cuda:1", 10)
    from forde.run_evaluation import evaluate_run

    with pytest.raises(ConfigError, match="forde eval runs as one process"):
        evaluate_run(Path("anywhere"))


def test_a_lost_peer_is_one_line():
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:3778: "
        "Connection reset by peer. This is typically caused by a remote worker hanging"
    )
    assert distributed.lost_peer(gloo).startswith(
        "another process of this run stopped, stopped answering or never "
        "joined (Read error [127.0.0.1]:3778: Connection reset by peer)"
    )
    assert distributed.lost_peer(ValueError("gloo")) is None and distributed.lost_peer(RuntimeError("shapes")) is None


def test_member_split_must_be_even():
    world = distributed.World(0, 3, 0, "members")
    with pytest.raises(ConfigError, match="ensemble_size = 4 does not split evenly over 3 processes"):
        distributed.check_config(TrainConfig(ensemble_size=4), world)
    for name in ("rde_feature", "node_bnn", "swag"):  # every method takes either strategy
        for strategy in distributed.STRATEGIES:
            distributed.check_config(
                TrainConfig(ensemble_size=4, method=MethodConfig(name=name)), distributed.World(0, 2, 0, strategy)
            )


# ---------------------------------------------------------------- `forde train` under torchrun, kills and resumes

QUICK = [
    "ensemble_size=4",
    "optim.epochs=2",
    "eval.corruptions=[none]",
    "eval.grad_samples=16",
    "run.progress=false",
    "data.val_fraction=0",
    "eval.calibrate=false",
]


def forde_train(out: Path, name: str, args: list[str], processes: int = 1, env: dict | None = None):
    """`forde train` in its own process(es): one plainly, several through torchrun (on the CPU: gloo)."""
    command = [sys.executable, "-m", "forde", "train", *args, f"run.out_dir={out}", f"run.name={name}"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        launcher += ["--master-port", str(distributed.free_port()), "-m", "forde"]
        command = launcher + command[3:]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["ensemble"]


@pytest.fixture(scope="module")
def one_process_quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    done = forde_train(out, "run", ["quickstart", *QUICK])
    assert done.returncode == 0, done.stderr
    return out / "run"


@pytest.mark.parametrize("strategy", distributed.STRATEGIES)
def test_torchrun_trains_the_quickstart_as_one_process_does(tmp_path, one_process_quickstart, strategy):
    done = forde_train(tmp_path, "run", ["quickstart", *QUICK, f"run.distributed={strategy}"], processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr  # rank 0 says how the run is spread
    reference = final_weights(one_process_quickstart)
    weights = final_weights(tmp_path / "run")
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=key)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    expected = json.loads((one_process_quickstart / "results.json").read_text())
    assert results["processes"] == {"count": 2, "strategy": strategy}
    assert results["summary"]["test/accuracy"] == pytest.approx(expected["summary"]["test/accuracy"], abs=0.01)
    assert done.stdout.count("run directory:") == 1  # one process prints the results
    if strategy == "members":  # evaluated again on one process, the record of how it was trained stays
        from forde.run_evaluation import evaluate_run

        again = evaluate_run(tmp_path / "run", ["eval.grad_samples=0"], out_name="again.json")
        assert again["processes"] == results["processes"] and again["train_time_s"] == results["train_time_s"]


STATEFUL_RUNS = {  # each method's own state, exercised: SWAG's moments and draws, node-BNN's noise, the shared head
    "swag": ["method.swag_start=0", "method.swag_rank=2", "method.swag_samples=2"],
    "node_bnn": ["method.node_components=2", "method.node_test_samples=1"],
    "rde_feature": [],
}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """name -> the method's one-process run (trained once for both strategies)."""
    runs: dict[str, Path] = {}

    def run(name: str, args: list[str]) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp(f"one-{name}")
            done = forde_train(out, "run", args)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[name] = out / "run"
        return runs[name]

    return run


@pytest.mark.parametrize(("name", "strategy"), [(n, s) for n in STATEFUL_RUNS for s in distributed.STRATEGIES])
def test_stateful_methods_train_and_evaluate_on_two_processes_as_on_one(tmp_path, one_process_run, name, strategy):
    """What SWAG collects and draws (batch norm refreshed on the training batches, sharded under `data`),
    node-BNN's per-example noise and Feature-RDE's shared classifier are one process's; so are the evaluation's
    draws. Under `members` each process keeps its members' SWAG moments and node-BNN noise and draws them as one
    process would, and its copy of the shared classifier stays the one classifier."""
    args = ["quickstart", *QUICK, "optim.epochs=1", f"method.name={name}", *STATEFUL_RUNS[name]]
    one = one_process_run(name, args)
    two = forde_train(tmp_path / "two", "run", [*args, f"run.distributed={strategy}"], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    reference, weights = final_weights(one), final_weights(tmp_path / "two" / "run")
    assert weights.keys() == reference.keys()
    if name == "swag":
        assert "swag.3.deviations" in weights and int(weights["swag.0.collected"]) == 1
    for key, value in reference.items():  # float32, the batch's shards summed in another order over 17 steps
        torch.testing.assert_close(weights[key], value, rtol=1e-3, atol=5e-4, msg=key)
    results = json.loads((tmp_path / "two" / "run" / "results.json").read_text())
    expected = json.loads((one / "results.json").read_text())
    draws = None if name == "rde_feature" else 2  # SWAG: 2 per member; node-BNN: 1 per each of 2 components
    assert results.get("eval_samples") == expected.get("eval_samples") == draws
    for key in ("test/nll", "test/accuracy", "test/epistemic"):
        assert results["summary"][key] == pytest.approx(expected["summary"][key], rel=1e-3), key


def rank_processes(out: Path, args: list[str], size: int = 2) -> list[subprocess.Popen]:
    """The ranks of one run started directly (as srun would), each its own process group: one can be killed."""
    port = distributed.free_port()
    procs = []
    for rank in range(size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank)}
        env.update(WORLD_SIZE=str(size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # as torchrun sets it
        command = [sys.executable, "-m", "forde", "train", *args, f"run.out_dir={out}", "run.name=run"]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_a_killed_rank_ends_the_others_with_one_line(tmp_path):
    procs = rank_processes(tmp_path, ["quickstart", *QUICK, "optim.epochs=8", "run.collective_timeout_s=120"])
    wait_for(tmp_path / "run" / "metrics.jsonl", procs)
    procs[1].kill()
    started = time.monotonic()
    _, err = procs[0].communicate(timeout=150)
    assert procs[0].returncode == 1
    assert time.monotonic() - started < 130  # the collective timeout bounds it; a dropped connection ends it sooner
    last = err.strip().splitlines()[-1]
    assert last.startswith("forde: process 0: another process of this run stopped"), err[-3000:]
    assert (tmp_path / "run" / "checkpoint.pt").exists()  # what was finished is kept ...
    procs[0].wait()
    resumed = forde_train(tmp_path, "run", ["quickstart", *QUICK, "optim.epochs=8", "run.collective_timeout_s=120"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]  # ... and resumes, here on one process
    assert "resuming" in resumed.stderr and (tmp_path / "run" / "results.json").exists()


def cifar_shaped(root: Path) -> list[str]:
    from test_datasets import write_cifar10

    write_cifar10(root, per_batch=16)
    return [
        "cifar10",
        f"data.root={root}",
        "ensemble_size=2",
        "model.width=4",
        "model.blocks=[1,1,1,1]",
        "optim.batch_size=8",
        "optim.epochs=2",
        "eval.batch_size=16",
        "data.val_fraction=0",
        "eval.calibrate=false",
        "eval.corruptions=[none]",
        "eval.ood=[]",
        "eval.grad_samples=8",
        "run.progress=false",
        "method.name=forde",
        "method.alpha=0.0",
    ]


@pytest.mark.parametrize(
    "strategy", ["members"]
)  # data: the same checkpoint code (slower here; the steps are tested above)
def test_a_stopped_two_process_forde_run_resumes_to_the_unstopped_result(tmp_path, strategy):
    args = [*cifar_shaped(tmp_path / "data"), f"run.distributed={strategy}"]
    unstopped = rank_processes(tmp_path / "unstopped", args)
    assert [p.wait(timeout=600) for p in unstopped] == [0, 0], [p.communicate()[1][-2000:] for p in unstopped]
    stopped = rank_processes(tmp_path / "stopped", args)
    wait_for(tmp_path / "stopped" / "run" / "metrics.jsonl", stopped)  # epoch 1 is checkpointed
    for p in stopped:
        p.kill()
        p.wait()
    assert not (tmp_path / "stopped" / "run" / "results.json").exists()
    resumed = rank_processes(tmp_path / "stopped", args)
    outcomes = [p.communicate(timeout=600) for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], [e[-2000:] for _, e in outcomes]
    assert "resuming" in outcomes[0][1]
    reference = final_weights(tmp_path / "unstopped" / "run")
    weights = final_weights(tmp_path / "stopped" / "run")
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- sweeps: a trial on several processes


def test_a_sweep_worker_trains_each_trial_on_several_processes(tmp_path, monkeypatch):
    """What `launch.py --gpus 0,1 --gpus-per-trial 2` gives a worker, on the CPU: its trials on two processes."""
    from sweep_support import FAST, launch

    monkeypatch.setenv("FORDE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv(trial_processes.PROCESSES_VARIABLE, "2")
    assert launch(tmp_path, "--n-trials", "1", "--no-wandb", *FAST) == 0
    run_dir = tmp_path / "studies" / "quickstart" / "runs" / "trial-0000"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["processes"] == {"count": 2, "strategy": "data"}
    assert (run_dir / "rank-1.log").exists()
    assert "RANK" not in os.environ  # the worker is one process again between trials


def test_a_dead_helper_is_the_environment_not_the_trial():
    from forde.sweep.lifecycle import ENVIRONMENT, TRIAL, classify

    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer"
    )
    assert classify(gloo) == ENVIRONMENT
    assert classify(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) == TRIAL


def test_gpus_per_trial_groups_the_gpus():
    from forde.sweep.options import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--study", "q", "--gpus", "0,1,2", "--gpus-per-trial", "2"], Path("."))
    with pytest.raises(SystemExit):
        parse_args(["--study", "q", "--gpus-per-trial", "2"], Path("."))
    assert parse_args(["--study", "q", "--gpus", "0,1,2,3", "--gpus-per-trial", "2"], Path(".")).gpus_per_trial == 2
