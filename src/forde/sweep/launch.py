"""`python sweeps/launch.py --study NAME`: check the study, prepare shared inputs once, run workers, report.

A study directory holds everything the study produced:
    study.yaml        the study file as run
    study.db          the Optuna storage (SQLite, unless --storage names a server)
    runs/trial-NNNN/  one run directory per trial (config, metrics, checkpoint, results, W&B files)
    best.md           the best trial(s) as a table
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from forde.config import ConfigError
from forde.sweep.study import Study, load_study
from forde.sweep.worker import open_study, run_worker, storage_for

log = logging.getLogger("forde.sweep")


def find_study_file(name_or_path: str, studies_dir: Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = studies_dir / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in studies_dir.glob("*.yaml"))
        raise ConfigError(f"no study '{name_or_path}' in {studies_dir}; known studies: {', '.join(known) or 'none'}")
    return candidate


def prepare_inputs(study: Study) -> None:
    """Load the data, fill the PCA cache and build missing corrupted sets once, before any worker starts:
    a missing dataset fails here, and workers never compute shared inputs twice."""
    from forde.data.corrupted import prepare_corrupted
    from forde.data.pca import dataset_pca
    from forde.data.registry import load_dataset

    cfg = study.trial_config({p.key: p.representative() for p in study.params if not p.when})
    dataset = load_dataset(cfg.data)
    methods = {cfg.method.name} | {c for p in study.params if p.key == "method.name" for c in (p.choices or [p.value])}
    if "forde" in methods:
        dataset_pca(dataset, cfg.data.root)
    prepare_corrupted(cfg, dataset)


def best_table(opt: optuna.Study, study: Study) -> str:
    """Markdown table of the best trial (single objective) or the Pareto front (several)."""
    done = opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return "no completed trials yet\n"
    best = opt.best_trials if study.multi_objective else [opt.best_trial]
    keys = sorted({k for t in best for k in t.params})
    metrics = [o.metric for o in study.objectives]
    head = ["trial", *metrics, *keys, "run_dir"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted(best, key=lambda t: t.number):
        vals = [f"{v:.4f}" for v in t.values]
        params = [_fmt(t.params.get(k, "")) for k in keys]
        lines.append("| " + " | ".join([str(t.number), *vals, *params, t.user_attrs.get("run_dir", "")]) + " |")
    title = "Pareto front" if study.multi_objective else "Best trial"
    return f"{title} of study '{study.name}' ({', '.join(f'{o.metric} {o.direction}' for o in study.objectives)})\n\n" \
           + "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def state_counts(opt: optuna.Study) -> str:
    counts: dict[str, int] = {}
    for t in opt.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))


def spawn_workers(args: argparse.Namespace, devices: list[str | None]) -> int:
    """One worker process per device (GPU id, or None for a CPU worker); returns the worst exit code."""
    procs = []
    for dev in devices:
        env = dict(os.environ)
        if dev is not None:
            env["CUDA_VISIBLE_DEVICES"] = dev
        else:  # CPU workers split the cores instead of each taking all of them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
        cmd = [sys.executable, "-m", "forde.sweep.launch", "--worker", "--study", str(args.study_file),
               "--storage", args.storage, "--out", str(args.out), *(["--no-wandb"] if args.no_wandb else []),
               *(["--n-trials", str(args.n_trials)] if args.n_trials else []), *args.overrides]
        procs.append(subprocess.Popen(cmd, env=env))
        log.info("started worker pid %d%s", procs[-1].pid, f" on GPU {dev}" if dev is not None else "")
    return max(p.wait() for p in procs)


def parse_args(argv: list[str] | None, studies_dir: Path) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch.py", description="Run (or resume) an Optuna study of FoRDE trainings.")
    p.add_argument("--study", required=True, help=f"a study name in {studies_dir} or a YAML path")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite file in the study directory); "
                                                   "postgresql://user@host/db lets workers on many machines share a study")
    p.add_argument("--out", type=Path, default=Path("studies"), help="parent of the study directory")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids: one worker process per GPU")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine when --gpus is not given")
    p.add_argument("--slurm", default=None, metavar="KEY=VALUE,...",
                   help="submit the workers to Slurm as a job array and return, e.g. partition=gpu,nodes=2,"
                        "gpus_per_node=4,time=24:00:00 (see forde.sweep.slurm)")
    p.add_argument("--prepare", action="store_true",
                   help="check the study, prepare its inputs and create it in the storage, then exit (for workers "
                        "started elsewhere with the same --study and --storage, e.g. deploy/sweep.yaml)")
    p.add_argument("--n-trials", type=int, default=None, help="override the study's trial budget")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="training-config overrides for every trial, e.g. optim.epochs=10")
    args = p.parse_args(argv)
    if args.slurm and (args.gpus or args.workers != 1):
        p.error("--slurm places the workers itself (nodes, gpus_per_node); drop --gpus and --workers")
    args.studies_dir = studies_dir
    return args


def main(argv: list[str] | None = None, studies_dir: Path | None = None) -> int:
    studies_dir = studies_dir or Path(__file__).resolve().parents[3] / "sweeps" / "studies"
    args = parse_args(argv, studies_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        args.study_file = find_study_file(args.study, studies_dir)
        study = load_study(args.study_file, args.overrides)
        if args.n_trials:
            study.n_trials = args.n_trials
        if args.slurm:  # before any data is prepared
            from forde.sweep import slurm
            slurm_spec = slurm.parse_spec(args.slurm)
            slurm_spec.partition = slurm.check_cluster(slurm_spec)
    except ConfigError as err:
        print(f"launch.py: {err}", file=sys.stderr)
        return 2
    study_dir = args.out / study.name
    if args.slurm and not args.storage:
        args.storage = slurm.default_storage(study_dir)
    args.storage = args.storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    if args.worker:
        run_worker(study, args.storage, study_dir, use_wandb=not args.no_wandb)
        return 0

    study_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.study_file, study_dir / "study.yaml")
    log.info("study '%s': %d trials, storage %s, directory %s", study.name, study.n_trials, args.storage, study_dir)
    try:
        prepare_inputs(study)
    except ConfigError as err:
        print(f"launch.py: study '{study.name}': {err}", file=sys.stderr)
        return 2
    open_study(study, storage_for(args.storage))  # create it once, before workers race to
    if args.slurm:
        return slurm.submit_workers(args, slurm_spec, study.name, study_dir)
    if args.prepare:
        print(f"study '{study.name}' is checked, its inputs prepared and it exists in {args.storage}")
        return 0
    devices = args.gpus.split(",") if args.gpus else [None] * args.workers
    if len(devices) == 1 and devices[0] is None:
        run_worker(study, args.storage, study_dir, use_wandb=not args.no_wandb)
        code = 0
    else:
        code = spawn_workers(args, devices)
    opt = open_study(study, storage_for(args.storage))
    table = best_table(opt, study)
    (study_dir / "best.md").write_text(table)
    print(f"\nstudy '{study.name}': {state_counts(opt)}\n")
    print(table)
    offline = sorted(study_dir.glob("runs/*/wandb/offline-run-*"))
    if offline:
        print(f"W&B runs were saved offline; browse them with `wandb leet {offline[0].parent}`, "
              f"upload with `wandb sync {study_dir}/runs/*/wandb/offline-run-*`")
    return code


if __name__ == "__main__":
    sys.exit(main())
