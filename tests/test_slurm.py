"""`launch.py --slurm`: the spec, and sweeps run as job arrays on a real Slurm.

The Slurm tests need a running Slurm whose partition is named by FORDE_TEST_SLURM_PARTITION:
`bash .ci/slurm-up DIR && source DIR/env` starts one on 127.0.0.1 (CI does). Its node offers two stand-in
GPUs, so the gres path (one GPU per array task, CUDA_VISIBLE_DEVICES set by Slurm) is exercised; what
only a GPU cluster checks is that training then runs on that GPU.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from forde.config import ConfigError
from forde.sweep.slurm import executor_parameters, parse_spec, time_minutes
from forde.sweep.storage import SweepStorage, default_url
from sweep_support import FAST, STUDIES, env_for, epochs_trained, launch_cmd

PARTITION = os.environ.get("FORDE_TEST_SLURM_PARTITION")


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("30:30", 31), ("24:00:00", 1440), ("1-12", 2160), ("2-00:30", 2910), ("1-00:00:01", 1441)],
)
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


def test_slurm_spec_maps_one_gpu_to_one_array_task():
    spec = parse_spec("partition=gpu,nodes=2,gpus_per_node=4,time=24:00:00,cpus_per_worker=8,mem=64G")
    assert spec.workers == 8
    params = executor_parameters(spec, "forde-x")
    assert params["gres"] == "gpu:1" and params["array_parallelism"] == 8 and params["time"] == 1440
    assert params["nodes"] == 1 and params["ntasks_per_node"] == 1 and params["cpus_per_task"] == 8
    assert params["partition"] == "gpu" and params["mem"] == "64G"
    cpu = parse_spec("nodes=3,gpus_per_node=0,time=60")
    assert cpu.workers == 3 and "gres" not in executor_parameters(cpu, "forde-x")


def test_slurm_trials_on_several_gpus_take_a_group_per_array_task():
    spec = parse_spec("partition=gpu,nodes=2,gpus_per_node=4,gpus_per_trial=2,time=60")
    assert spec.workers == 4 and executor_parameters(spec, "forde-x")["gres"] == "gpu:2"
    with pytest.raises(ConfigError, match="gpus_per_node=4 does not split into groups of 3"):
        parse_spec("partition=gpu,gpus_per_node=4,gpus_per_trial=3,time=60")


@pytest.mark.parametrize(
    "text,message",
    [
        ("partition=gpu,gpu=4,time=60", r"unknown key 'gpu'; known keys: time, partition"),
        ("nodes=two,time=60", r"nodes: must be a whole number, got 'two'"),
        ("nodes=0,time=60", r"nodes: must be at least 1"),
        ("partition=gpu", r"time limit, e.g. time=24:00:00"),
        ("time=1:2:3:4", r"time: '1:2:3:4' is not a Slurm time limit"),
        ("time=2", r"too short.*at least 3 minutes"),
        ("partition", r"'partition' is not key=value"),
    ],
)
def test_bad_slurm_specs_name_the_key(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(text)


def test_slurm_without_slurm_fails_before_preparing_anything(tmp_path):
    env = {**env_for(tmp_path), "PATH": str(Path(sys.executable).parent)}  # python, but no sbatch
    out = subprocess.run(
        launch_cmd(tmp_path, "--slurm", "time=60", "--no-wandb", *FAST), env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and "sbatch and sinfo are not on PATH" in out.stderr
    assert not (tmp_path / "studies").exists() and not (tmp_path / "data").exists()


# --- against a real Slurm -------------------------------------------------------------------------------


@pytest.fixture
def slurm():
    if not PARTITION:
        if os.environ.get("FORDE_REQUIRE_SLURM"):
            pytest.fail("FORDE_TEST_SLURM_PARTITION is not set but Slurm is required")
        pytest.skip("no Slurm (bash .ci/run starts one; or `bash .ci/slurm-up DIR && source DIR/env`)")
    submitted: list[str] = []
    yield submitted
    for job in submitted:  # nothing left queued if a test fails midway
        subprocess.run(["scancel", job], capture_output=True)


def submit(tmp_path, submitted, *args, study="quickstart", storage: str | None = None):
    """Submit with the given storage (default: --slurm's own, a journal file in the study directory)."""
    where = ["--storage", storage] if storage else []
    out = subprocess.run(
        launch_cmd(tmp_path, *where, "--no-wandb", *args, study=study),
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    job = re.search(r"as job array (\d+)", out.stdout).group(1)
    submitted.append(job)
    return job, out.stdout


def squeue(job: str) -> list[str]:
    return subprocess.run(
        ["squeue", "--noheader", "-j", job, "--format=%i %T %r"], capture_output=True, text=True
    ).stdout.split("\n")[:-1]


def wait_until(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def study_trials(tmp_path, name="quickstart", storage: str | None = None):
    url = storage or default_url(tmp_path / "studies" / name, "journal")
    return optuna.load_study(study_name=name, storage=SweepStorage(url).optuna).get_trials()


def test_slurm_array_runs_the_study_one_gpu_per_worker(tmp_path, slurm):
    job, printed = submit(
        tmp_path,
        slurm,
        "--n-trials",
        "4",
        "--slurm",
        f"partition={PARTITION},gpus_per_node=2,cpus_per_worker=1,time=10",
        *FAST,
    )
    for hint in (f"squeue -j {job}", f"scancel {job}", f"slurm/{job}_<task>_0_log.out"):
        assert hint in printed
    folder = tmp_path / "studies" / "quickstart" / "slurm"
    script = (folder / f"{job}_submission.sh").read_text()
    for line in ("--array=0-1%2", "--gres=gpu:1", "--time=10", "--signal=USR2@90", f"--partition={PARTITION}"):
        assert f"#SBATCH {line}\n" in script
    wait_until(lambda: not squeue(job), 300, f"job array {job}")

    trials = study_trials(tmp_path)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4
    for t in trials:
        assert epochs_trained(Path(t.user_attrs["run_dir"])) == [1, 2, 3]
    logs = [(folder / f"{job}_{task}_0_log.err").read_text() for task in (0, 1)]
    gpus = [re.search(r"CUDA_VISIBLE_DEVICES=(\S*)", log).group(1) for log in logs]
    assert sorted(gpus) == ["0", "1"]  # Slurm gave each worker its own GPU
    assert all("no trials left in study 'quickstart'" in log for log in logs)  # both served the study to its end
    best = (tmp_path / "studies" / "quickstart" / "best.md").read_text()
    assert f"| {min(trials, key=lambda t: t.value).number} |" in best


def test_preempted_slurm_worker_is_requeued_and_resumes_its_trial(tmp_path, slurm):
    epochs = 60
    sqlite = f"sqlite:///{tmp_path / 'study.db'}"
    job, _ = submit(
        tmp_path,
        slurm,
        "--n-trials",
        "1",
        "--slurm",
        f"partition={PARTITION},gpus_per_node=0,cpus_per_worker=1,time=60",
        f"optim.epochs={epochs}",
        "model.hidden=[32]",
        "eval.corruptions=[none]",
        storage=sqlite,
    )
    run_dir = tmp_path / "studies" / "quickstart" / "runs" / "trial-0000"
    wait_until(lambda: (run_dir / "checkpoint.pt").exists() and len(epochs_trained(run_dir)) >= 3, 180, "three epochs")
    # what Slurm sends 90 s before the time limit (submitit's --signal=USR2@90), and at preemption
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_until(lambda: squeue(job) and squeue(job)[0].split()[1] == "PENDING", 60, "the requeue")
    # Slurm holds a requeued job for two minutes before it may start again; release it now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    wait_until(lambda: not squeue(job), 300, f"job {job}")

    folder = tmp_path / "studies" / "quickstart" / "slurm"
    log = (folder / f"{job}_0_log.err").read_text()
    # submitit logs "Requeued job" after `scontrol requeue` has begun to stop the job, so that line may be lost;
    # the restart count Slurm gives the second start is the proof that the same job was requeued
    assert "this job is preempted" in log and "(array task 0, restart 1)" in log
    resumed_at = int(re.search(r"resuming \S+ from epoch (\d+)", log).group(1))
    assert 3 <= resumed_at < epochs
    trials = study_trials(tmp_path, storage=sqlite)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # the interrupted attempt, its retry
    assert trials[0].user_attrs["failure"] == "interrupted"  # not a kill: time limits never use up the retries
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert epochs_trained(run_dir) == list(range(1, epochs + 1))  # resumed, nothing trained twice


def test_bad_partition_study_or_request_submits_nothing(tmp_path, slurm):
    out = subprocess.run(
        launch_cmd(tmp_path, "--slurm", "partition=nosuch,time=60", *FAST),
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "no partition 'nosuch'; partitions: " in out.stderr and PARTITION in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((STUDIES / "quickstart.yaml").read_text() + "  method.alpah: {low: 0.0, high: 1.0}\nname: bad\n")
    out = subprocess.run(
        launch_cmd(tmp_path, "--slurm", f"partition={PARTITION},time=60", study=str(bad)),
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "did you mean 'method.alpha'" in out.stderr
    assert not (tmp_path / "studies").exists()
    out = subprocess.run(
        launch_cmd(
            tmp_path,
            "--slurm",
            f"partition={PARTITION},time=60,mem=999999G",
            *FAST,
            "--storage",
            f"sqlite:///{tmp_path / 'study.db'}",
        ),
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "sbatch refused the workers" in out.stderr and "job array" not in out.stdout
