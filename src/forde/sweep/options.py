"""The launcher's command line: parsed once, and handed on to each worker (a local process or a Slurm task)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna

from forde import interrupts
from forde.config import ConfigError
from forde.sweep.lifecycle import STORAGE_ERRORS, describe
from forde.sweep.storage import SweepStorage, default_url
from forde.sweep.study import Study, read_study


def parse_args(argv: list[str] | None, studies_dir: Path) -> argparse.Namespace:
    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
        return value

    p = argparse.ArgumentParser(prog="launch.py", description="Run (or resume) an Optuna study of FoRDE trainings.")
    p.add_argument("--study", required=True, help=f"a study name in {studies_dir} or a YAML path")
    p.add_argument(
        "--storage",
        default=None,
        help="sqlite:///PATH (default: study.db in the study directory), postgresql://USER@HOST/DB (workers "
        "on many machines share a database server) or journal:PATH (a log file on a shared filesystem)",
    )
    p.add_argument("--out", type=Path, default=Path("studies"), help="parent of the study directory")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids: one worker process per GPU")
    p.add_argument(
        "--gpus-per-trial",
        type=positive,
        default=1,
        help="GPUs each trial trains on, as one ensemble over that many processes (run.distributed chooses how); "
        "--gpus 0,1,2,3 --gpus-per-trial 2 runs two trials at a time",
    )
    p.add_argument(
        "--workers", type=positive, default=1, help="worker processes on this machine when --gpus is not given"
    )
    p.add_argument(
        "--slurm",
        default=None,
        metavar="KEY=VALUE,...",
        help="submit the workers to Slurm as a job array and return, e.g. partition=gpu,nodes=2,"
        "gpus_per_node=4,time=24:00:00 (see forde.sweep.slurm)",
    )
    p.add_argument(
        "--prepare",
        action="store_true",
        help="check the study, prepare its inputs and create it in the storage, then exit (for workers "
        "started elsewhere with the same --study and --storage, e.g. deploy/sweep.yaml)",
    )
    p.add_argument("--status", action="store_true", help="print the study's state and best trials, change nothing")
    p.add_argument("--n-trials", type=positive, default=None, help="override the study's trial budget")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="build the networks that the study file (or its base config) names as code "
        "(model.name=PACKAGE.MODULE:CALLABLE, or a timm model with model.kwargs): only for files you trust",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="training-config overrides for every trial, e.g. optim.epochs=10")
    args = p.parse_args(argv)
    if args.slurm and (args.gpus or args.workers != 1):
        p.error("--slurm places the workers itself (nodes, gpus_per_node); drop --gpus and --workers")
    if args.gpus and args.workers != 1:
        p.error("--gpus starts one worker per GPU; drop --workers")
    if args.gpus_per_trial > 1 and not args.gpus:
        p.error("--gpus-per-trial needs --gpus: name the GPUs to group, e.g. --gpus 0,1,2,3 --gpus-per-trial 2")
    if args.gpus and len(args.gpus.split(",")) % args.gpus_per_trial:
        p.error(
            f"--gpus {args.gpus}: {len(args.gpus.split(','))} GPUs do not split into groups of --gpus-per-trial "
            f"{args.gpus_per_trial}; name a multiple of {args.gpus_per_trial} GPUs"
        )
    args.studies_dir = studies_dir
    return args


def find_study_file(name_or_path: str, studies_dir: Path) -> Path:
    """A YAML path, a file, or the name of a built-in study (a folder of that name, e.g. the study's own output
    folder in the working directory, does not hide it)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    candidate = studies_dir / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in studies_dir.glob("*.yaml"))
        raise ConfigError(f"no study '{name_or_path}' in {studies_dir}; known studies: {', '.join(known) or 'none'}")
    return candidate


def resolve(args: argparse.Namespace) -> tuple[Study, Path, SweepStorage]:
    """The study (with --n-trials applied), its directory and its storage (not opened yet)."""
    args.study_file = find_study_file(args.study, args.studies_dir)
    study = read_study(args.study_file, args.overrides, trust_code=args.trust_code, build=not args.status)
    if args.n_trials:
        study.n_trials = args.n_trials
    study_dir = args.out / study.name
    storage = SweepStorage(args.storage or default_url(study_dir, "journal" if args.slurm else "sqlite"))
    return study, study_dir, storage


def worker_argv(args: argparse.Namespace, storage_url: str) -> list[str]:
    """The launcher's arguments that run one worker of this study: a local process or a Slurm array task."""
    return [
        "--worker",
        "--study",
        str(args.study_file),
        "--storage",
        storage_url,
        "--out",
        str(args.out),
        *(["--no-wandb"] if args.no_wandb else []),
        *(["--trust-code"] if args.trust_code else []),
        *(["--n-trials", str(args.n_trials)] if args.n_trials else []),
        *args.overrides,
    ]


EXIT_ENVIRONMENT = 3  # a lasting failure of the environment stopped the launcher or a worker


def run_command(args: argparse.Namespace, body: Callable[[argparse.Namespace], int]) -> int:
    """Run a launcher or a worker: logging, signal handlers, and one line (not a traceback) for bad input or a stop."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    previous = interrupts.install(worker=args.worker)
    stopped = False
    try:
        return body(args)
    except ConfigError as err:
        print(f"launch.py: {err}", file=sys.stderr)
        return 2
    except STORAGE_ERRORS as err:  # the environment outside any trial (a full disk, the database gone): one line
        print(f"launch.py: {describe(err)}; fix it and re-run the same command", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except interrupts.Interrupted as err:
        stopped = True
        who = f"worker {os.getpid()}" if args.worker else "launch.py"
        print(
            f"{who}: interrupted by {err}; the trials it stopped resume from their checkpoints when you re-run "
            "the same command",
            file=sys.stderr,
        )
        return 128 + err.signum
    finally:
        if stopped:  # leaving: a repeated Ctrl-C landing in the interpreter's exit handlers would print a traceback
            interrupts.ignore_stops()
        else:
            interrupts.restore(previous)
