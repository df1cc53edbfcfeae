"""A trial on several devices: the worker trains it as rank 0 of a process group, with helper processes as the other
ranks, started for each attempt (`launch.py --gpus 0,1,2,3 --gpus-per-trial 2`: two workers, each trial on two GPUs).

The helpers run `python -m forde train` on the trial's config, written by the worker into the study directory, with
the environment torchrun would give them; each logs to `<run_dir>/rank-N.log`. They live only as long as the
attempt: a helper that dies ends rank 0's next exchange with an error the lifecycle counts as the environment's
(the attempt is retried from its checkpoint), and rank 0 leaving (finished, failed, interrupted or killed) ends
theirs; whatever happens, the worker waits for them, and kills those still alive after a grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from forde.atomic import write_atomic
from forde.config import TrainConfig, to_yaml

log = logging.getLogger(__name__)

PROCESSES_VARIABLE = "FORDE_TRIAL_PROCESSES"  # set by the launcher for workers whose trials take several devices
RANK_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
GRACE_S = 60.0  # helpers still running this long after rank 0 returned are killed


def processes_per_trial() -> int:
    return int(os.environ.get(PROCESSES_VARIABLE, "1"))


@contextlib.contextmanager
def trial_processes(cfg: TrainConfig, run_dir: Path, processes: int):
    """Within this block, `train(cfg)` in this process is rank 0 of `processes` (nothing changes for one)."""
    if processes <= 1:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "ranks-config.yaml"
    write_atomic(config_file, to_yaml(cfg))
    from forde.distributed import free_port  # torch, which only a worker that trains imports

    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(processes)}
    helpers = []
    for rank in range(1, processes):
        env = {**os.environ, **shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        with open(run_dir / f"rank-{rank}.log", "ab") as out:
            command = [sys.executable, "-m", "forde", "train", str(config_file), "--trust-code"]
            helpers.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
    log.info("trial on %d processes: this worker and helpers %s", processes, ", ".join(str(h.pid) for h in helpers))
    saved = {k: os.environ.get(k) for k in RANK_VARIABLES}
    os.environ.update(shared, RANK="0", LOCAL_RANK="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for helper in helpers:
            try:
                helper.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
