"""`forde train | eval | config | report`: thin wrappers over the library."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from forde.config import ConfigError, MissingDataError, builtin_config_names, load_config, to_yaml
from forde.errors import RunError

if TYPE_CHECKING:
    from forde.config import DataConfig
    from forde.data.corrupted_sets import GenerationReport
    from forde.data.pca import PCA

log = logging.getLogger("forde")


def main_process() -> bool:
    """Rank 0 of a distributed run, or the only process (torch is imported only when a launcher set the ranks)."""
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        return True
    from forde.distributed import ranks_from_env

    ranks = ranks_from_env()
    return ranks is None or ranks[0] == 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


HEADLINE = (
    ("accuracy", "accuracy"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("epistemic", "epistemic"),
    ("grad_cosine_distance", "grad. cos. dist."),
)


CALIBRATION = (
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("adaptive_ece", "adaptive ECE"),
    ("brier", "Brier"),
    ("aurc", "AURC"),
    ("augrc", "AUGRC"),
)
DETECTION = (("auroc", "AUROC"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"), ("fpr95", "FPR95"))
OOD_SCORES = ("msp", "mi")  # the printed scores (results.json has every one)


def _table(summary: dict, columns: tuple, rows: list[tuple[str, str]], key=lambda prefix, k: f"{prefix}/{k}") -> list:
    lines = [f"{'':30}" + "".join(f"{label:>14}" for _, label in columns)]
    for prefix, name in rows:
        values = [summary.get(key(prefix, k)) for k, _ in columns]
        if any(v is not None for v in values):
            lines.append(f"{name:30}" + "".join(f"{v:14.4f}" if v is not None else f"{'-':>14}" for v in values))
    return lines if len(lines) > 1 else []


def headline(summary: dict) -> str:
    """The paper's columns (clean test metrics beside cA / cNLL / cECE: each severity's sets pooled, averaged over
    severities); then calibration and abstention before and after temperature scaling, and OOD detection."""
    rows = [("test", "test"), ("val", "val"), ("corrupted", "corrupted (cA/cNLL/cECE)")]
    lines = [f"{'':26}" + "".join(f"{label:>18}" for _, label in HEADLINE)]
    for prefix, name in rows:
        if f"{prefix}/accuracy" in summary:
            lines.append(
                f"{name:26}" + "".join(f"{summary.get(f'{prefix}/{k}', float('nan')):18.4f}" for k, _ in HEADLINE)
            )
    temperature = summary.get("temperature")
    calibrated = [("test", "test"), ("test/ts", f"test, T = {temperature:.3f}" if temperature else "test/ts")]
    calibrated += [("corrupted", "corrupted"), ("corrupted/ts", "corrupted, temperature-scaled")]
    lines += [""] + _table(summary, CALIBRATION, calibrated)
    sets = sorted({k.split("/")[1] for k in summary if k.startswith("ood/")})
    ood_rows = [(f"ood/{s}/{{}}_{score}", f"OOD {s} ({score})") for s in sets for score in OOD_SCORES]
    lines += [""] + _table(summary, DETECTION, ood_rows, key=lambda prefix, k: prefix.format(k)) if sets else []
    return "\n".join(line for line in lines).rstrip()


def cmd_train(args: argparse.Namespace) -> None:
    from forde.run_dir import run_dir_of
    from forde.train import train

    cfg = load_config(args.config, args.overrides, trust_code=args.trust_code)
    results = train(cfg)
    if main_process():  # one of several processes (torchrun, srun) speaks
        print(headline(results["summary"]))
        print(f"run directory: {run_dir_of(cfg)} (results.json holds every metric)")


def cmd_eval(args: argparse.Namespace) -> None:
    from forde.run_evaluation import evaluate_run

    results = evaluate_run(Path(args.run_dir), args.overrides, out_name=args.out, trust_code=args.trust_code)
    print(headline(results["summary"]))


def _dataset(args: argparse.Namespace):
    from forde.config import DataConfig
    from forde.data.registry import load_dataset

    return load_dataset(DataConfig(name=args.dataset, root=args.root))


def run_corrupt_command(
    images,
    labels,
    out_dir,
    table: str | None,
    seed: int,
    corruptions: Iterable[str],
    severities: Iterable[int],
    layout: str,
    workers: int | None,
    *,
    class_dirs: Sequence[str] | None = None,
    file_names: Sequence[str] | None = None,
    on_commit: Callable[[str, int], None] | None = None,
) -> GenerationReport:
    """What `forde data corrupt` runs: generate the set and say what was done and where."""
    from forde.data.corrupted_sets import PARTS_DIR, generate_corrupted_set
    from forde.data.corruption_names import select
    from forde.data.corruptions import default_table

    names = select(list(corruptions))
    severities = sorted(set(severities))
    side = images.shape[-1]
    print(
        f"corrupting {len(images)} images of {side}x{side} with the '{table or default_table(side)}' parameters "
        f"(seed {seed}): {len(names)} corruptions x severities {severities}, {layout} layout, "
        f"{workers or os.cpu_count()} workers -> {Path(out_dir).resolve()}"
    )
    report = generate_corrupted_set(
        images,
        labels,
        out_dir,
        table=table,
        seed=seed,
        corruptions=names,
        severities=severities,
        layout=layout,
        class_dirs=class_dirs,
        file_names=file_names,
        workers=workers,
        on_commit=on_commit,
    )
    print(
        f"{len(report.written)} (corruption, severity) outputs written, {len(report.skipped)} already there, "
        f"in {report.seconds:.1f} s"
    )
    if layout == "npy":
        print(f"complete files: {', '.join(n + '.npy' for n in report.assembled) or 'none new'}")
        partial = sorted({n for n in names if not (report.out_dir / f"{n}.npy").is_file()})
        if partial:
            print(
                f"only some severities of {', '.join(partial)}: their blocks stay in "
                f"{report.out_dir / PARTS_DIR} until all 5 severities exist"
            )
    return report


def cmd_data_corrupt(args: argparse.Namespace) -> None:
    from forde.config import TrainConfig
    from forde.data.corrupted import (
        GENERATION_SEED,
        check_source,
        corrupted_root,
        layout_for,
        raise_problems,
        source_recorder,
    )
    from forde.data.corrupted_loader import missing_corrupted
    from forde.data.corruption_names import select

    ds = _dataset(args)
    cfg = TrainConfig()
    cfg.data.root, cfg.eval.corrupted_root = args.root, args.check or args.out
    out = corrupted_root(cfg, ds)
    try:
        names = select(args.corruptions)
    except ValueError as err:
        raise ConfigError(f"--corruptions: {err}") from None
    check_source(out, ds)
    raise_problems(out, ds, names, args.severities)  # before generating: what is there must fit the test set
    if args.check:
        missing = missing_corrupted(out, names, args.severities)
        if missing:
            shown = ", ".join(f"{n} s{s}" for n, s in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise MissingDataError(
                f"{out} lacks {len(missing)} of the {len(names) * len(args.severities)} sets "
                f"asked for ({shown}); `forde data corrupt --dataset {args.dataset} --out {out}` "
                "generates them"
            )
        print(
            f"{out}: all {len(names) * len(args.severities)} sets fit the {ds.name} test set "
            f"({len(ds.full.test)} images of {'x'.join(map(str, ds.input_shape[1:]))}, {ds.num_classes} classes)"
        )
        return
    run_corrupt_command(
        ds.test.inputs,
        ds.test.labels,
        out,
        None,
        GENERATION_SEED,
        names,
        args.severities,
        layout_for(ds),
        args.workers,
        class_dirs=ds.class_names or None,
        on_commit=source_recorder(out, ds, GENERATION_SEED),
    )


def cmd_data_import(args: argparse.Namespace) -> None:
    from forde.config import DataConfig
    from forde.data.imagefolder import import_folder

    max_pixels = args.max_pixels or DataConfig().max_image_pixels
    out = import_folder(args.src, args.name, args.root, args.allow_empty_classes, max_pixels)
    print(f"imported {args.src} as '{args.name}' into {out}; train on it with data.name={args.name}")


def run_pca_command(cfg: DataConfig, top: int = 10) -> PCA:
    """`forde data pca`: compute (or reuse) the dataset's PCA cache and log its top eigenvalues."""
    from forde.data.pca import dataset_pca
    from forde.data.registry import load_dataset

    ds = load_dataset(cfg)
    pca = dataset_pca(ds, cfg.root)
    share = pca.eigenvalues / pca.eigenvalues.sum()
    log.info(
        "PCA of %s (%d training inputs, D = %d): top %d eigenvalues %s; they explain %.1f%% of the variance",
        ds.name,
        len(ds.train),
        len(pca.eigenvalues),
        top,
        ", ".join(f"{v:.4g}" for v in pca.eigenvalues[:top].tolist()),
        100 * share[:top].sum().item(),
    )
    return pca


def cmd_data_pca(args: argparse.Namespace) -> None:
    from forde.config import DataConfig

    run_pca_command(DataConfig(name=args.dataset, root=args.root))


def cmd_data_grid(args: argparse.Namespace) -> None:
    from forde.analysis.corruption_grid import save_corruption_grid

    ds = _dataset(args)
    image = ds.test.inputs[args.index].permute(1, 2, 0).numpy()
    print(f"wrote {save_corruption_grid(image, args.out)}")


def cmd_report(args: argparse.Namespace) -> None:
    from forde.analysis.report import run

    run(args)


def cmd_config(args: argparse.Namespace) -> None:
    print(to_yaml(load_config(args.config, args.overrides, trust_code=True)), end="")  # printed, nothing built


TRUST_HELP = (
    "build the network that the config file names (model.name=PACKAGE.MODULE:CALLABLE, or a timm model with "
    "model.kwargs), which runs its code: only for files you trust. A model.name given on the command line needs "
    "no flag"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forde", description="First-order Repulsive Deep Ensembles")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    builtins = ", ".join(builtin_config_names())

    p = sub.add_parser("train", help="train one ensemble and write a run directory")
    p.add_argument("config", help=f"a YAML file or a built-in config ({builtins})")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.alpha=0.4")
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a run directory's checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="eval.* / device overrides, e.g. eval.corruptions=[none]")
    p.add_argument(
        "--out", default="results.json", help="file name written in the run directory (not one of the run's own files)"
    )
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    root_default = os.environ.get("FORDE_DATA", "data")
    p = data.add_parser(
        "import-folder",
        help="turn an ImageFolder tree (SRC/train/<class>/*, SRC/test/<class>/*) "
        "into a dataset that data.name=NAME loads",
    )
    p.add_argument("src")
    p.add_argument("name")
    p.add_argument("--root", default=root_default, help="data root (default: $FORDE_DATA or ./data)")
    p.add_argument(
        "--allow-empty-classes",
        action="store_true",
        help="keep class folders that hold no images (default: refuse them)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse any image of more pixels (default: data.max_image_pixels, 4096 x 4096)",
    )
    p.set_defaults(func=cmd_data_import)
    p = data.add_parser("pca", help="compute (or reuse) the PCA cache of a dataset's training split")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", default=root_default)
    p.set_defaults(func=cmd_data_pca)
    p = data.add_parser("corrupt", help="build the corrupted test set (all corruptions x severities), resumable")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", default=root_default, help="data root (default: $FORDE_DATA or ./data)")
    p.add_argument("--out", default=None, help="default: <root>/<dataset>-C, where training looks for it")
    p.add_argument("--corruptions", nargs="+", default=["all"], help="all, benchmark, or names")
    p.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5], choices=[1, 2, 3, 4, 5])
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument(
        "--check",
        metavar="DIR",
        default=None,
        help="generate nothing: check the sets in DIR (an official release, a copy) against the test set, "
        "as training does before its first epoch",
    )
    p.set_defaults(func=cmd_data_corrupt)
    p = data.add_parser("grid", help="picture of one test image under every corruption x severity")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", default=root_default)
    p.add_argument("--index", type=int, default=0, help="which test image")
    p.add_argument("--out", default="corruptions.png", help="PNG or PDF path")
    p.set_defaults(func=cmd_data_grid)

    p = sub.add_parser("report", help="tables and figures for a study's finished runs")
    p.add_argument("study_dir", type=Path, help="a folder with run directories below it (and optionally study.db)")
    p.add_argument("--out", type=Path, help="output folder (default: STUDY_DIR/report)")
    p.add_argument("--paper", action="store_true", help="show the paper's reported numbers beside ours")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite STUDY_DIR/study.db when present)")
    p.add_argument("--study-name", help="the Optuna study (default: every study in the storage)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also load finished runs from the W&B API")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="print the resolved config (every key, with overrides applied)")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # overrides after an option (`forde eval RUN --out F eval.corruptions=[none]`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except MissingDataError as err:  # a dataset or prepared input missing or unusable: names the file and the fix
        print(f"forde: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        if main_process():  # every process of a distributed run finds the same error
            print(f"forde: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "forde: interrupted; what was finished is kept, and the same command continues from there", file=sys.stderr
        )
        return 130
    except OSError as err:  # a full disk: one line naming the file; finished work stays and resumes
        if err.errno != errno.ENOSPC:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(
            f"forde: no space left on the device{where}; free space there (or write elsewhere) and run the same "
            "command again: what was finished is kept",
            file=sys.stderr,
        )
        return 2
    except RunError as err:  # a run directory that cannot be read back or written, a diverged run: one line
        print(f"forde: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # another process of a distributed run died or hung: one line, not a traceback
        from forde.distributed import lost_peer

        message = lost_peer(err)
        if message is None:
            raise
        print(f"forde: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
