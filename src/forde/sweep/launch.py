"""`python sweeps/launch.py --study NAME`: check the study, prepare shared inputs once, run workers, report.

A study directory holds everything the study produced:
    study.yaml        the study file as run
    study.db          the Optuna storage (SQLite, unless --storage names a server or a journal file)
    runs/trial-NNNN/  one run directory per configuration (config, metrics, checkpoints, results, W&B files)
    best.md           the best trial(s) as a table

Before any data is prepared: the study file, the storage (reachable, writable), the output directory
(writable) and the settings a re-launch must share with the study's first launch are checked. Workers
are child processes (one per GPU, or --workers N on the CPU), or with one CPU worker the launcher itself;
the rules of the budget are in forde.sweep.lifecycle, signals in forde.interrupts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import optuna

from forde import interrupts
from forde.atomic import write_atomic
from forde.config import ConfigError, identity_changes
from forde.interrupts import Interrupted
from forde.sweep import slurm
from forde.sweep.folder import BEST, OWNER, check_folder, save_study_file
from forde.sweep.lifecycle import DONE, GIVEN_UP, KILLED, RUNNING, WORKER, Ledger, fate, lineage
from forde.sweep.options import EXIT_ENVIRONMENT, parse_args, resolve, run_command, worker_argv
from forde.sweep.outages import patiently
from forde.sweep.storage import SweepStorage
from forde.sweep.study import Study
from forde.sweep.summary import best_table, status
from forde.sweep.trial_processes import PROCESSES_VARIABLE
from forde.sweep.worker import Sweep, run_worker, serve

__all__ = ["main", "parse_args"]

log = logging.getLogger("forde.sweep")

SETTINGS = "settings"  # study user attribute: what every trial shares (see Study.settings)
STUDY_ID = "forde_study_id"  # study user attribute, and the first line of STUDY_DIR/study.id: the folder's study


def prepare_inputs(study: Study) -> None:
    """Load the data, fill the PCA cache and build missing corrupted sets once, before any worker starts:
    a missing dataset fails here, and workers never compute shared inputs twice."""
    from forde.data.corrupted import prepare_corrupted
    from forde.data.ood_sets import ood_sets
    from forde.data.pca import dataset_pca
    from forde.data.registry import load_dataset

    cfg = study.trial_config({p.key: p.representative() for p in study.params if not p.when})
    dataset = load_dataset(cfg.data)
    methods = {cfg.method.name} | {c for p in study.params if p.key == "method.name" for c in (p.choices or [p.value])}
    if "forde" in methods:
        dataset_pca(dataset, cfg.data.root)
    prepare_corrupted(cfg, dataset)
    ood_sets(cfg, dataset)  # present, or one line before any worker starts


def check_writable(study_dir: Path) -> None:
    """The study directory, and its runs/ when present, must take new files (before any data is prepared)."""
    for folder in (study_dir, study_dir / "runs"):
        if folder == study_dir / "runs" and not folder.exists():
            break
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"cannot write to {folder} ({err.strerror or err}); make it writable or choose another --out"
            ) from None


def check_settings(opt: optuna.Study, study: Study) -> None:
    """A study keeps the settings of its first launch (base config and overrides): trials of one study must be
    comparable, and a killed trial must resume with the config it started with."""
    current, saved = study.settings(), opt.user_attrs.get(SETTINGS)
    if saved is None or not opt.get_trials(deepcopy=False):  # a first launch that stopped early binds nothing
        opt.set_user_attr(SETTINGS, current)
        return
    changes = identity_changes(saved, current)
    if changes:
        raise ConfigError(
            f"study '{study.name}' was started with other settings; changed: {'; '.join(changes)}. "
            "Re-run with the overrides it was started with to continue it, or run the new settings as "
            "a new study (a copy of the study file with another `name:`)"
        )


def gpu_devices(gpus: str, visible: str | None, count: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each worker for `--gpus`: ids count among the GPUs this process sees
    (CUDA_VISIBLE_DEVICES, e.g. from Slurm, renumbers them), and each must exist; no GPU is not a CPU run."""
    ids = [i.strip() for i in gpus.split(",")]
    if not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {gpus}: expected distinct GPU ids separated by commas, e.g. --gpus 0,1")
    if count == 0:
        raise ConfigError(
            f"--gpus {gpus}: torch sees no CUDA device on this machine; drop --gpus to train on the "
            "CPU (--workers N), or install a CUDA build of torch"
        )
    missing = [i for i in ids if int(i) >= count]
    if missing:
        raise ConfigError(
            f"--gpus {gpus}: no GPU {', '.join(missing)}; this machine shows {count} (ids 0-{count - 1}"
            f"{', after CUDA_VISIBLE_DEVICES=' + visible if visible else ''})"
        )
    names = visible.split(",") if visible else ids
    return [names[int(i)].strip() if visible else i for i in ids]


def held_by(study_dir: Path) -> tuple[str, str] | None:
    """(study id, storage) that the folder's study.id records, if it has one."""
    marker = study_dir / OWNER
    if not marker.is_file():
        return None
    lines = marker.read_text().split("\n")
    return lines[0], lines[1] if len(lines) > 1 else ""


def holds(storage: SweepStorage, name: str) -> bool:
    """Whether the storage holds a study of this name, seen without creating anything."""
    return storage.exists() and name in optuna.get_all_study_names(storage.optuna)


def check_folder_storage(study_dir: Path, storage: SweepStorage, name: str) -> None:
    """Before the storage is created: a folder that records its study (study.id) is launched only with that study's
    storage, which must hold it (else a new, empty study would be made there, and then refused)."""
    held = held_by(study_dir)
    if held is None:
        return
    try:
        recorded = (
            optuna.load_study(study_name=name, storage=storage.optuna).user_attrs if holds(storage, name) else None
        )
    except Exception:  # an unreachable or unreadable storage: its own check says so, in one line
        return
    if recorded is None or recorded.get(STUDY_ID) not in (None, held[0]):
        raise ConfigError(
            f"{study_dir} holds the runs of the study '{name}' in {held[1] or 'another storage'}, not of one in "
            f"{storage.display}; continue it with --storage {held[1] or 'URL'}, or give this one its own folder "
            "with another --out"
        )


def check_owner(opt: optuna.Study, storage: SweepStorage, study_dir: Path) -> None:
    """A study directory serves one study: trial N of another storage of the same name would take over (or fail
    on) the run directory of this one's trial N. The folder records the study's id, which lives in the storage
    (so moving either keeps them paired); a study started before ids adopts the folder its trials use."""
    marker = study_dir / OWNER
    held = marker.read_text().split("\n", 2) if marker.exists() else None
    mine = opt.user_attrs.get(STUDY_ID)
    runs = study_dir / "runs"
    claimed_by_another = held is not None and held[0] != mine
    runs_of_another = (
        mine is None and held is None and not opt.get_trials(deepcopy=False) and any(runs.glob("*/config.yaml"))
    )
    if claimed_by_another or runs_of_another:
        where = f" (storage {held[1]})" if held and len(held) > 1 else ""
        raise ConfigError(
            f"{study_dir} holds the runs of another study of this name{where}, not of the one in "
            f"{storage.display}; continue that study with its --storage, or give this one its own "
            "folder with another --out"
        )
    if mine is None:
        mine = uuid.uuid4().hex
        opt.set_user_attr(STUDY_ID, mine)
    if held is None:
        write_atomic(marker, f"{mine}\n{storage.display}\n")


def spawn_workers(args: argparse.Namespace, devices: Sequence[str | None], sweep: Sweep) -> int:
    """One worker process per device (GPU id, or None for a CPU worker) until all have exited; a worker that dies
    is reported with its trial. Returns the launcher's exit code."""
    procs: dict[subprocess.Popen, str | None] = {}
    with interrupts.forwarding(lambda: list(procs)) as received:
        for dev in devices:
            env = dict(os.environ)
            env.pop("WANDB_SERVICE", None)  # each worker its own W&B service: one outliving a killed worker keeps none
            if dev is not None:
                env["CUDA_VISIBLE_DEVICES"] = dev
                env[PROCESSES_VARIABLE] = str(len(dev.split(",")))
            else:  # CPU workers split the cores instead of each taking all of them
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
            cmd = [
                sys.executable,
                "-m",
                "forde.sweep.launch",
                "--parent-pid",
                str(os.getpid()),
                *worker_argv(args, sweep.storage.url),
            ]
            p = subprocess.Popen(cmd, env=env)
            procs[p] = dev
            log.info("started worker pid %d%s", p.pid, f" on GPU {dev}" if dev is not None else "")
        while [p for p in procs if p.poll() is None]:  # poll every one: a dead worker is reaped at once
            time.sleep(0.2)
    code = patiently(account_for_workers, sweep, procs, received, what="accounting for the workers")
    if received:
        raise Interrupted(received[0])
    return code


def account_for_workers(sweep: Sweep, procs: dict[subprocess.Popen, str | None], received: list[int]) -> int:
    """After the workers exited: their trials' fates settled in the storage, each death reported; the launcher's exit
    code. Reads the study afresh, so it may be repeated after a storage error."""
    host = socket.gethostname()
    # the trial each worker was on when it died: still running, or already failed by another worker's check
    last_trial = {t.user_attrs.get(WORKER): t for t in sweep.trials() if fate(t) in (RUNNING, KILLED, GIVEN_UP)}
    stopped = {}
    if len(received) > 1:  # killed by their launcher on request: stopped, not lost to the machine's memory
        how = f"a second {signal.Signals(received[1]).name} to the launcher"
        stopped = {f"{host}:{p.pid}": how for p in procs if p.returncode == -signal.SIGKILL}
    sweep.settle(stopped)  # a dead worker's trial: failed with its reason, queued again
    ledger = Ledger(sweep.trials())
    code = 0
    for p, dev in procs.items():
        where = f" (GPU {dev})" if dev is not None else ""
        if p.returncode < 0 and not received:
            trial = last_trial.get(f"{host}:{p.pid}")
            log.error(
                "worker %d%s was killed by %s%s",
                p.pid,
                where,
                signal.Signals(-p.returncode).name,
                "" if trial is None else f" during trial {trial.number}; " + what_became_of(ledger, trial),
            )
            code = max(code, 1)
        elif p.returncode == EXIT_ENVIRONMENT:
            code = EXIT_ENVIRONMENT
        elif p.returncode != 0 and not received:
            log.error("worker %d%s exited with code %d", p.pid, where, p.returncode)
            code = max(code, 1)
    return code


def what_became_of(ledger: Ledger, attempt: optuna.trial.FrozenTrial) -> str:
    """What became of a killed worker's trial, from all the attempts of its configuration."""
    if lineage(attempt) not in ledger.configurations:
        return "its run had not begun; the study draws or queues it again"
    fates = ledger.of(attempt).fates
    if DONE in fates:
        return "another worker finished it from its checkpoint"
    if GIVEN_UP in fates:
        return "it is given up (see its fail_reason)"
    return "it resumes from its checkpoint when the sweep is re-run (re-run this command)"


def main(argv: list[str] | None = None, studies_dir: Path | None = None) -> int:
    studies_dir = studies_dir or Path(__file__).resolve().parents[3] / "sweeps" / "studies"
    args = parse_args(argv, studies_dir)
    return run_command(args, serve if args.worker else launch)


def show_status(study: Study, storage: SweepStorage, study_dir: Path) -> int:
    """`--status`: the study's state and best trials, read from its storage; nothing is started, prepared or written."""
    if not holds(storage, study.name):
        held = held_by(study_dir)
        elsewhere = f"; its folder names the storage {held[1]}: pass --storage {held[1]}" if held and held[1] else ""
        raise ConfigError(
            f"no study '{study.name}' in {storage.display} yet{elsewhere or '; launch it without --status to start it'}"
        )
    opt = optuna.load_study(study_name=study.name, storage=storage.optuna)
    print(f"{status(opt.get_trials(deepcopy=False), study)}\n\n{best_table(opt, study)}", end="")
    return 0


def launch(args: argparse.Namespace) -> int:
    study, study_dir, storage = resolve(args)
    if args.status:
        return show_status(study, storage, study_dir)
    slurm_spec = None
    if args.slurm:  # the cluster is checked before the storage is created and any data is prepared
        slurm_spec = slurm.parse_spec(args.slurm)
        slurm_spec.partition = slurm.check_cluster(slurm_spec)
    devices: Sequence[str | None] = [None] * args.workers
    if args.gpus:
        import torch

        devices = gpu_devices(args.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
        n = args.gpus_per_trial  # one worker per group of GPUs; each of its trials one process per GPU
        devices = [",".join(devices[i : i + n]) for i in range(0, len(devices), n)]
    check_folder(study_dir)
    check_folder_storage(study_dir, storage, study.name)
    storage.check()
    check_writable(study_dir)
    sweep = Sweep(study, storage)  # create the study once, before workers race to
    check_settings(sweep.opt, study)
    with storage.budget_lock(study.name):
        check_owner(sweep.opt, storage, study_dir)
    save_study_file(args.study_file, study_dir, study.name)
    log.info(
        "study '%s': %d configurations, storage %s, directory %s", study.name, study.size, storage.display, study_dir
    )
    try:
        prepare_inputs(study)
    except ConfigError as err:
        raise ConfigError(f"study '{study.name}': {err}") from None
    if slurm_spec is not None:
        return slurm.submit_workers(args, slurm_spec, study.name, study_dir, storage)
    if args.prepare:
        print(f"study '{study.name}' is checked, its inputs prepared and it exists in {storage.display}")
        return 0
    if len(devices) == 1 and devices[0] is None:
        with interrupts.between_steps(worker=False):
            code = run_worker(study, storage, study_dir, use_wandb=not args.no_wandb)
        sweep.settle()  # a trial its last failure left unqueued: queued, so the summary shows it waiting
    else:
        sweep.settle()  # before the workers start: dead trials are queued again once, not raced for
        code = spawn_workers(args, devices, sweep)
    return finish(sweep, study_dir, code)


def finish(sweep: Sweep, study_dir: Path, code: int) -> int:
    """The summary: best.md, the study's state and what to do next. A full or read-only disk costs the file, not
    the summary."""
    study, storage = sweep.study, sweep.storage
    table, state = patiently(
        lambda: (best_table(sweep.opt, study), status(sweep.trials(), study)), what="summarising the study"
    )
    try:
        write_atomic(study_dir / BEST, table)  # a link planted there meanwhile is replaced, not followed
    except OSError as err:
        print(f"launch.py: could not write {study_dir / BEST} ({err.strerror})", file=sys.stderr)
    print(f"\n{state}\n")
    print(table)
    offline = sorted(study_dir.glob("runs/*/wandb/offline-run-*"))
    if offline:
        print(
            f"W&B runs were saved offline; browse them with `wandb leet {offline[0].parent}`, "
            f"upload with `wandb sync {study_dir}/runs/*/wandb/offline-run-*`"
        )
    print(
        f"Browse the study live with `optuna-dashboard {dashboard_url(storage)}` "
        "(pip install optuna-dashboard); draw its figures with `forde report " + str(study_dir) + "`"
    )
    return code


def dashboard_url(storage: SweepStorage) -> str:
    """The storage as optuna-dashboard takes it: a SQLite file below the working directory by its relative path
    (what the user typed, and what they can paste), anything else as logged."""
    path = storage.path
    if storage.kind == "sqlite" and path is not None and path.is_absolute() and path.is_relative_to(Path.cwd()):
        return f"sqlite:///{path.relative_to(Path.cwd())}"
    return storage.display.removeprefix("journal:")


if __name__ == "__main__":
    sys.exit(main())
