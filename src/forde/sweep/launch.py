"""`python sweeps/launch.py --study NAME`: check the study, prepare shared inputs once, run workers, report.

A study directory holds everything the study produced:
    study.yaml        the study file as run
    study.db          the Optuna storage (SQLite, unless --storage names a server or a journal file)
    runs/trial-NNNN/  one run directory per trial (config, metrics, checkpoints, results, W&B files)
    best.md           the best trial(s) as a table

Before any data is prepared: the study file, the storage (reachable, writable), the output directory
(writable) and the settings a re-launch must share with the study's first launch are checked. Workers
are child processes (one per GPU, or --workers N on the CPU); SIGTERM or Ctrl-C on the launcher stops
them and leaves their trials to resume from their checkpoints; a worker whose launcher is killed stops
by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

from forde import interrupts
from forde.config import ConfigError, identity_changes
from forde.sweep.storage import SweepStorage, default_url
from forde.sweep.study import Study, load_study
from forde.sweep.worker import (EXIT_ENVIRONMENT, FAILURE, GIVEN_UP, INTERRUPTED, KILLED, Interrupted, budget_used,
                                lineage, lineages, mark_failed, open_study, reconcile, run_worker)

log = logging.getLogger("forde.sweep")

SETTINGS = "settings"  # study user attribute: what every trial shares (see Study.settings)
STUDY_ID = "forde_study_id"  # study user attribute, and the first line of STUDY_DIR/study.id: the folder's study
OWNER = "study.id"


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
    """'3 complete, 1 pruned, 1 failed (killed), 1 waiting': trial states, failures by their kind."""
    counts = Counter(f"failed ({t.user_attrs.get(FAILURE, 'trial')})" if t.state == TrialState.FAIL else t.state.name.lower()
                     for t in opt.get_trials(deepcopy=False))
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "no trials"


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
            raise ConfigError(f"cannot write to {folder} ({err.strerror or err}); make it writable or choose "
                              "another --out") from None


def check_settings(opt: optuna.Study, study: Study) -> None:
    """A study keeps the settings of its first launch (base config and overrides): trials of one study must be
    comparable, and a killed trial must resume with the config it started with."""
    current, saved = study.settings(), opt.user_attrs.get(SETTINGS)
    if saved is None or not opt.get_trials(deepcopy=False):  # a first launch that stopped early binds nothing
        opt.set_user_attr(SETTINGS, current)
        return
    changes = identity_changes(saved, current)
    if changes:
        raise ConfigError(f"study '{study.name}' was started with other settings; changed: {'; '.join(changes)}. "
                          "Re-run with the overrides it was started with to continue it, or run the new settings as "
                          "a new study (a copy of the study file with another `name:`)")


def gpu_devices(gpus: str, visible: str | None, count: int) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each worker for `--gpus`: ids count among the GPUs this process sees
    (CUDA_VISIBLE_DEVICES, e.g. from Slurm, renumbers them), and each must exist; no GPU is not a CPU run."""
    ids = [i.strip() for i in gpus.split(",")]
    if not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {gpus}: expected distinct GPU ids separated by commas, e.g. --gpus 0,1")
    if count == 0:
        raise ConfigError(f"--gpus {gpus}: torch sees no CUDA device on this machine; drop --gpus to train on the "
                          "CPU (--workers N), or install a CUDA build of torch")
    missing = [i for i in ids if int(i) >= count]
    if missing:
        raise ConfigError(f"--gpus {gpus}: no GPU {', '.join(missing)}; this machine shows {count} (ids 0-{count - 1}"
                          f"{', after CUDA_VISIBLE_DEVICES=' + visible if visible else ''})")
    names = visible.split(",") if visible else ids
    return [names[int(i)].strip() if visible else i for i in ids]


def check_owner(opt: optuna.Study, storage: SweepStorage, study_dir: Path) -> None:
    """A study directory serves one study: trial N of another storage of the same name would take over (or fail
    on) the run directory of this one's trial N. The folder records the study's id, which lives in the storage
    (so moving either keeps them paired); a study started before ids adopts the folder its trials use."""
    marker = study_dir / OWNER
    held = marker.read_text().split("\n", 2) if marker.exists() else None
    mine = opt.user_attrs.get(STUDY_ID)
    runs = study_dir / "runs"
    claimed_by_another = held is not None and held[0] != mine
    runs_of_another = (mine is None and held is None and not opt.get_trials(deepcopy=False)
                       and any(runs.glob("*/config.yaml")))
    if claimed_by_another or runs_of_another:
        where = f" (storage {held[1]})" if held and len(held) > 1 else ""
        raise ConfigError(f"{study_dir} holds the runs of another study of this name{where}, not of the one in "
                          f"{storage.display}; continue that study with its --storage, or give this one its own "
                          "folder with another --out")
    if mine is None:
        mine = uuid.uuid4().hex
        opt.set_user_attr(STUDY_ID, mine)
    if held is None:
        marker.write_text(f"{mine}\n{storage.display}\n")


def raise_on_signals(worker: bool = False, ignore_repeats: bool = False) -> None:
    """SIGTERM (and SIGINT) raise Interrupted in the main thread, once. A second signal ends the launcher at once;
    a worker ignores it: `timeout`, systemd or a signal to the process group reach a worker both directly and
    through its launcher, and the launcher's second Ctrl-C sends SIGKILL. Workers leave Ctrl-C to the launcher."""
    then = signal.SIG_IGN if worker or ignore_repeats else signal.SIG_DFL

    def handler(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, then)
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.SIG_IGN if worker else handler)


@contextlib.contextmanager
def signals_between_steps(worker: bool):
    """While trials run, a signal is acted on at the next training step (see forde.interrupts); a repeated one
    is ignored by a worker process and stops a launcher's own trial at once. Once acted on, more signals are
    ignored: a stopped trial whose record is cut short would be taken for one killed by the machine."""
    raise_on_signals(worker, ignore_repeats=True)
    with interrupts.deferred(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, repeat_acts_now=not worker):
        yield
    raise_on_signals(worker)


def stop_when_orphaned(parent_pid: int) -> None:
    """A worker whose launcher died (even by kill -9) stops like on SIGTERM instead of running on unattended."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        log.warning("worker %d: the launcher (pid %d) is gone; stopping", os.getpid(), parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def worker_argv(args: argparse.Namespace, storage_url: str) -> list[str]:
    """The launcher's arguments that run one worker of this study: a local process or a Slurm array task."""
    return ["--worker", "--study", str(args.study_file), "--storage", storage_url, "--out", str(args.out),
            *(["--no-wandb"] if args.no_wandb else []),
            *(["--n-trials", str(args.n_trials)] if args.n_trials else []), *args.overrides]


def spawn_workers(args: argparse.Namespace, devices: list[str | None], opt: optuna.Study,
                  storage: SweepStorage, study: Study) -> int:
    """One worker process per device (GPU id, or None for a CPU worker) until all have exited. SIGTERM or
    Ctrl-C is passed on to them (a second one kills them); a worker that dies is reported with its trial.
    Returns the launcher's exit code."""
    procs: dict[subprocess.Popen, str | None] = {}
    interrupted: list[int] = []

    def forward(signum, frame):
        interrupted.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if len(interrupted) == 1 else signal.SIGKILL)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    for dev in devices:
        env = dict(os.environ)
        env.pop("WANDB_SERVICE", None)  # each worker its own W&B service: one that outlives a killed worker keeps none
        if dev is not None:
            env["CUDA_VISIBLE_DEVICES"] = dev
        else:  # CPU workers split the cores instead of each taking all of them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
        cmd = [sys.executable, "-m", "forde.sweep.launch", "--parent-pid", str(os.getpid()), *worker_argv(args, storage.url)]
        p = subprocess.Popen(cmd, env=env)
        procs[p] = dev
        log.info("started worker pid %d%s", p.pid, f" on GPU {dev}" if dev is not None else "")
    while [p for p in procs if p.poll() is None]:  # poll every one: a dead worker is reaped at once
        time.sleep(0.2)
    host = socket.gethostname()
    # the trial each worker was on when it died: still running, or already failed by another worker's check
    last_trial = {t.user_attrs.get("worker"): t for t in opt.get_trials(deepcopy=False)
                  if t.state == TrialState.RUNNING or t.user_attrs.get(FAILURE) in (KILLED, GIVEN_UP)}
    with storage.budget_lock(study.name):
        if len(interrupted) > 1:  # killed by their launcher on request: stopped, not lost to the machine's memory
            killed = {f"{host}:{p.pid}" for p in procs if p.returncode == -signal.SIGKILL}
            for worker, t in last_trial.items():
                if worker in killed and t.state == TrialState.RUNNING:
                    mark_failed(opt, t._trial_id, INTERRUPTED,
                                f"interrupted: a second {signal.Signals(interrupted[1]).name} to the launcher killed its "
                                "worker; resumes from its last checkpoint when the sweep is re-run")
        reconcile(opt, storage)  # a dead worker's trial: failed with its reason, queued again
    attempts = lineages(opt.get_trials(deepcopy=False))
    code = 0
    for p, dev in procs.items():
        where = f" (GPU {dev})" if dev is not None else ""
        if p.returncode < 0 and not interrupted:
            trial = last_trial.get(f"{host}:{p.pid}")
            log.error("worker %d%s was killed by %s%s", p.pid, where, signal.Signals(-p.returncode).name,
                      "" if trial is None else f" during trial {trial.number}; " + fate(attempts[lineage(trial)]))
            code = max(code, 1)
        elif p.returncode == EXIT_ENVIRONMENT:
            code = EXIT_ENVIRONMENT
        elif p.returncode != 0 and not interrupted:
            log.error("worker %d%s exited with code %d", p.pid, where, p.returncode)
            code = max(code, 1)
    if interrupted:
        raise Interrupted(interrupted[0])
    return code


def fate(attempts: list[optuna.trial.FrozenTrial]) -> str:
    """What became of a killed worker's trial, from all its attempts."""
    if any(a.state in (TrialState.COMPLETE, TrialState.PRUNED) for a in attempts):
        return "another worker finished it from its checkpoint"
    if any(a.user_attrs.get(FAILURE) == "given_up" for a in attempts):
        return "it is given up (see its fail_reason)"
    return "it resumes from its checkpoint when the sweep is re-run (re-run this command)"


def parse_args(argv: list[str] | None, studies_dir: Path) -> argparse.Namespace:
    def positive(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
        return value

    p = argparse.ArgumentParser(prog="launch.py", description="Run (or resume) an Optuna study of FoRDE trainings.")
    p.add_argument("--study", required=True, help=f"a study name in {studies_dir} or a YAML path")
    p.add_argument("--storage", default=None,
                   help="sqlite:///PATH (default: study.db in the study directory), postgresql://USER@HOST/DB (workers "
                        "on many machines share a database server) or journal:PATH (a log file on a shared filesystem)")
    p.add_argument("--out", type=Path, default=Path("studies"), help="parent of the study directory")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids: one worker process per GPU")
    p.add_argument("--workers", type=positive, default=1, help="worker processes on this machine when --gpus is not given")
    p.add_argument("--slurm", default=None, metavar="KEY=VALUE,...",
                   help="submit the workers to Slurm as a job array and return, e.g. partition=gpu,nodes=2,"
                        "gpus_per_node=4,time=24:00:00 (see forde.sweep.slurm)")
    p.add_argument("--prepare", action="store_true",
                   help="check the study, prepare its inputs and create it in the storage, then exit (for workers "
                        "started elsewhere with the same --study and --storage, e.g. deploy/sweep.yaml)")
    p.add_argument("--n-trials", type=positive, default=None, help="override the study's trial budget")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="training-config overrides for every trial, e.g. optim.epochs=10")
    args = p.parse_args(argv)
    if args.slurm and (args.gpus or args.workers != 1):
        p.error("--slurm places the workers itself (nodes, gpus_per_node); drop --gpus and --workers")
    if args.gpus and args.workers != 1:
        p.error("--gpus starts one worker per GPU; drop --workers")
    args.studies_dir = studies_dir
    return args


def main(argv: list[str] | None = None, studies_dir: Path | None = None) -> int:
    studies_dir = studies_dir or Path(__file__).resolve().parents[3] / "sweeps" / "studies"
    args = parse_args(argv, studies_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    raise_on_signals(worker=args.worker)
    if args.worker and args.parent_pid:
        stop_when_orphaned(args.parent_pid)
    try:
        return launch(args)
    except ConfigError as err:
        print(f"launch.py: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        who = f"worker {os.getpid()}" if args.worker else "launch.py"
        print(f"{who}: interrupted by {err}; the trials it stopped resume from their checkpoints when you re-run "
              "the same command", file=sys.stderr)
        return 128 + err.signum
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def launch(args: argparse.Namespace) -> int:
    args.study_file = find_study_file(args.study, args.studies_dir)
    study = load_study(args.study_file, args.overrides)
    if args.n_trials:
        study.n_trials = args.n_trials
    study_dir = args.out / study.name
    slurm_spec = None
    if args.slurm:  # the cluster is checked before any data is prepared
        from forde.sweep import slurm
        slurm_spec = slurm.parse_spec(args.slurm)
        slurm_spec.partition = slurm.check_cluster(slurm_spec)
    storage = SweepStorage(args.storage or default_url(study_dir, "journal" if args.slurm else "sqlite"))
    storage.check(patient=args.worker)
    if args.worker:
        with signals_between_steps(worker=True):
            return run_worker(study, storage, study_dir, use_wandb=not args.no_wandb)

    check_writable(study_dir)
    devices = [None] * args.workers
    if args.gpus:
        import torch
        devices = gpu_devices(args.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
    opt = open_study(study, storage)  # create it once, before workers race to
    check_settings(opt, study)
    with storage.budget_lock(study.name):
        check_owner(opt, storage, study_dir)
    shutil.copyfile(args.study_file, study_dir / "study.yaml")
    log.info("study '%s': %d trials, storage %s, directory %s", study.name, study.n_trials, storage.display, study_dir)
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
        with signals_between_steps(worker=False):
            code = run_worker(study, storage, study_dir, use_wandb=not args.no_wandb)
        with storage.budget_lock(study.name):
            reconcile(opt, storage)  # a trial its last failure left un-queued: queued, and counted below
    else:
        with storage.budget_lock(study.name):
            reconcile(opt, storage)  # before the workers start: dead trials are re-queued once, not raced for
        code = spawn_workers(args, devices, opt, storage, study)
    table = best_table(opt, study)
    (study_dir / "best.md").write_text(table)
    trials = opt.get_trials(deepcopy=False)
    print(f"\nstudy '{study.name}': {state_counts(opt)}; budget {budget_used(trials)} of {study.n_trials} trials used\n")
    print(table)
    offline = sorted(study_dir.glob("runs/*/wandb/offline-run-*"))
    if offline:
        print(f"W&B runs were saved offline; browse them with `wandb leet {offline[0].parent}`, "
              f"upload with `wandb sync {study_dir}/runs/*/wandb/offline-run-*`")
    print(f"Browse the study live with `optuna-dashboard {storage.display.removeprefix('journal:')}` "
          "(pip install optuna-dashboard); draw its figures with `forde report " + str(study_dir) + "`")
    return code


if __name__ == "__main__":
    sys.exit(main())
