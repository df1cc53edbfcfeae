"""`launch.py --slurm partition=gpu,nodes=2,gpus_per_node=4,time=24:00:00`: the study's workers as a Slurm
job array, submitted through submitit.

Each worker is one array task holding one GPU (`--gres=gpu:1`; Slurm sets its CUDA_VISIBLE_DEVICES), so
`nodes x gpus_per_node` workers start wherever GPUs are free and are preempted or resubmitted one at a
time. With `gpus_per_node=0` the array has `nodes` CPU workers. A worker is the launcher's `--worker`
mode, run inside the task; on timeout or preemption submitit calls its `checkpoint()` and requeues it,
and the requeued worker's study re-queues the interrupted trial, which resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError

from forde.config import ConfigError
from forde.sweep import worker
from forde.sweep.options import worker_argv
from forde.sweep.storage import SweepStorage
from forde.sweep.study import read_study
from forde.sweep.summary import best_table
from forde.sweep.trial_processes import PROCESSES_VARIABLE

log = logging.getLogger("forde.sweep")

EXAMPLE = "partition=gpu,nodes=2,gpus_per_node=4,time=24:00:00"
SIGNAL_S = 90  # submitit's warning before the time limit (USR2): the worker requeues itself
MIN_MINUTES = 3


@dataclass
class SlurmSpec:
    """What `--slurm key=value,...` asks for."""

    time: str = ""  # each worker's time limit (Slurm syntax); required
    partition: str | None = None  # the cluster's default partition when not given
    nodes: int = 1
    gpus_per_node: int = 1  # one worker per GPU; 0 for CPU workers (one per node)
    gpus_per_trial: int = 1  # GPUs each worker holds, its trials one ensemble over them (forde.distributed)
    cpus_per_worker: int | None = None
    mem: str | None = None  # memory per worker, Slurm syntax (e.g. 32G)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    resubmits: int = 20  # time-outs a worker may be resubmitted after (preemptions: unlimited)

    @property
    def workers(self) -> int:
        return self.nodes * ((self.gpus_per_node // self.gpus_per_trial) or 1)

    @property
    def minutes(self) -> int:
        return time_minutes(self.time)


def time_minutes(text: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(text)
    days, b, c = (int(g) if g else None for g in m.group(1, 3, 4))
    a = int(m.group(2))  # the one group every format has
    if days is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + (b or 0) * 60 + c  # b is set whenever c is
    else:  # M or M:S
        seconds = a * 60 + (b or 0)
    return math.ceil(seconds / 60)


def parse_spec(text: str) -> SlurmSpec:
    """`key=value,...` -> SlurmSpec; a bad key or value raises ConfigError naming it and the fix."""
    fields = {f.name: f for f in dataclasses.fields(SlurmSpec)}
    values: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value.strip():
            raise ConfigError(f"--slurm: '{item}' is not key=value; e.g. --slurm {EXAMPLE}")
        if key not in fields:
            raise ConfigError(f"--slurm: unknown key '{key}'; known keys: {', '.join(fields)}")
        value = value.strip()
        if fields[key].type in ("int", "int | None"):
            if not value.isdigit():
                raise ConfigError(f"--slurm {key}: must be a whole number, got '{value}'")
            values[key] = int(value)
        else:
            values[key] = value
    spec = SlurmSpec(**values)
    if not spec.time:
        raise ConfigError(
            "--slurm: give each worker's time limit, e.g. time=24:00:00 (D-HH:MM:SS or minutes); "
            "a worker that reaches it is resubmitted and continues"
        )
    try:
        minutes = spec.minutes
    except ValueError:
        raise ConfigError(
            f"--slurm time: '{spec.time}' is not a Slurm time limit; use e.g. 24:00:00, 1-12:00:00 or 90 (minutes)"
        ) from None
    if minutes < MIN_MINUTES:  # Slurm signals SIGNAL_S before the limit, up to a minute early
        raise ConfigError(
            f"--slurm time: {spec.time} is too short; a worker is warned {SIGNAL_S} s before its limit "
            f"(up to a minute earlier), so give it at least {MIN_MINUTES} minutes"
        )
    for key in ("nodes", "cpus_per_worker", "gpus_per_trial"):
        if getattr(spec, key) == 0:
            raise ConfigError(f"--slurm {key}: must be at least 1")
    if spec.gpus_per_trial > 1 and spec.gpus_per_node % spec.gpus_per_trial:
        raise ConfigError(
            f"--slurm gpus_per_trial={spec.gpus_per_trial}: gpus_per_node={spec.gpus_per_node} does not split into "
            f"groups of {spec.gpus_per_trial}; make gpus_per_node a multiple of it"
        )
    return spec


def check_cluster(spec: SlurmSpec) -> str:
    """Ask Slurm whether the job can run at all (before any data is prepared); returns the partition."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        raise ConfigError(
            "--slurm: Slurm's sbatch and sinfo are not on PATH; run the launcher on a login node of the cluster"
        )
    out = subprocess.run(["sinfo", "--noheader", "--format=%P %G"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ConfigError(f"--slurm: sinfo failed ({out.stderr.strip()}); is the cluster reachable from here?")
    gres: dict[str, set[str]] = {}
    default = None
    for line in out.stdout.splitlines():
        name, _, node_gres = line.strip().partition(" ")
        if name.endswith("*"):
            name = default = name[:-1]
        gres.setdefault(name, set()).add(node_gres)
    partition = spec.partition or default
    if partition not in gres:
        which = f"partition '{spec.partition}'" if spec.partition else "a default partition"
        raise ConfigError(f"--slurm partition: the cluster has no {which}; partitions: {', '.join(sorted(gres))}")
    if spec.gpus_per_node and not any("gpu" in g for g in gres[partition]):
        raise ConfigError(
            f"--slurm gpus_per_node={spec.gpus_per_node}: partition '{partition}' has no GPUs "
            f"(gres: {', '.join(sorted(gres[partition]))}); name a GPU partition, or set "
            f"gpus_per_node=0 for CPU workers"
        )
    return partition


def executor_parameters(spec: SlurmSpec, job_name: str) -> dict:
    """submitit SlurmExecutor parameters for one array task = one worker."""
    params = {
        "job_name": job_name,
        "time": spec.minutes,
        "nodes": 1,
        "ntasks_per_node": 1,
        "array_parallelism": spec.workers,
        "signal_delay_s": SIGNAL_S,
    }
    if spec.gpus_per_node:
        params["gres"] = f"gpu:{spec.gpus_per_trial}"
    optional = {
        "partition": spec.partition,
        "cpus_per_task": spec.cpus_per_worker,
        "mem": spec.mem,
        "account": spec.account,
        "qos": spec.qos,
        "constraint": spec.constraint,
    }
    return params | {k: v for k, v in optional.items() if v is not None}


class SlurmWorker(submitit.helpers.Checkpointable):
    """One array task: the launcher's worker mode, then the study's best table. Checkpointable's
    `checkpoint()` resubmits this same worker on timeout or preemption; its state lives in the storage
    and the run directories, so a restart is a continuation."""

    def __init__(
        self,
        argv: list[str],
        study_file: Path,
        storage: str,
        study_dir: Path,
        overrides: list[str],
        n_trials: int | None,
        trust_code: bool = False,
        processes_per_trial: int = 1,
    ):
        self.argv, self.study_file, self.storage, self.study_dir = argv, study_file, storage, study_dir
        self.overrides, self.n_trials, self.trust_code = overrides, n_trials, trust_code
        self.processes_per_trial = processes_per_trial

    def __call__(self, task: int) -> int:
        env = submitit.JobEnvironment()
        os.environ[PROCESSES_VARIABLE] = str(self.processes_per_trial)  # trials on the task's GPUs together
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # CPU workers use the cores Slurm gave them, not every core of the node
            import torch

            torch.set_num_threads(int(cpus))
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
        logging.getLogger("submitit").propagate = False  # it has its own handler; once is enough
        log.info(
            "Slurm job %s (array task %d, restart %s) on %s, CUDA_VISIBLE_DEVICES=%s",
            env.job_id,
            task,
            os.environ.get("SLURM_RESTART_COUNT", "0"),
            env.hostname,
            os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        )
        code = worker.main(self.argv)
        self.write_best()
        return code

    def write_best(self) -> None:
        """best.md as it stands when this worker finds nothing left to start (the last worker's is final)."""
        study = read_study(self.study_file, self.overrides, trust_code=self.trust_code)
        study.n_trials = self.n_trials or study.n_trials
        opt = worker.open_study(study, SweepStorage(self.storage))
        (self.study_dir / "best.md").write_text(best_table(opt, study))


def submit_workers(args, spec: SlurmSpec, study_name: str, study_dir: Path, storage: SweepStorage) -> int:
    """Submit the array (after the launcher's checks and preparation), say how to follow it; the exit code."""
    out, study_dir = Path(args.out).resolve(), study_dir.resolve()
    study_file = Path(args.study_file).resolve()
    argv = worker_argv(argparse.Namespace(**{**vars(args), "study_file": study_file, "out": out}), storage.url)
    worker = SlurmWorker(
        argv,
        study_file,
        storage.url,
        study_dir,
        list(args.overrides),
        args.n_trials,
        args.trust_code,
        spec.gpus_per_trial if spec.gpus_per_node else 1,
    )
    executor = submitit.SlurmExecutor(folder=study_dir / "slurm", max_num_timeout=spec.resubmits)
    executor.update_parameters(**executor_parameters(spec, f"forde-{study_name}"))
    try:
        jobs = executor.map_array(worker, range(spec.workers))
    except FailedJobError as err:
        print(f"launch.py: --slurm: sbatch refused the workers: {err}", file=sys.stderr)
        return 2
    array_id = jobs[0].job_id.split("_")[0]  # a one-worker array is a plain job
    logs = str(jobs[0].paths.stdout).replace(jobs[0].job_id, f"{array_id}_<task>" if len(jobs) > 1 else array_id)
    each = "1 GPU" if spec.gpus_per_node else f"{spec.cpus_per_worker or 'the default number of'} CPU(s)"
    print(
        f"\nstudy '{study_name}': {spec.workers} workers submitted to Slurm as job array {array_id} "
        f"({each} and {spec.minutes // 60}:{spec.minutes % 60:02d}:00 each, partition {spec.partition}, "
        f"storage {storage.display})\n"
        f"  follow:   squeue -j {array_id}\n"
        f"  logs:     {logs} and .err\n"
        f"  cancel:   scancel {array_id}\n"
        f"  results:  {study_dir}/best.md (rewritten as workers finish), forde report {study_dir}\n"
        f"A worker that times out or is preempted is resubmitted and its trial resumes from its checkpoint."
    )
    return 0
