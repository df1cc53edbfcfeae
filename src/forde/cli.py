"""`forde train | eval | config | report`: thin wrappers over the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from forde.config import ConfigError, builtin_config_names, load_config, to_yaml

log = logging.getLogger("forde")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")


HEADLINE = (("accuracy", "accuracy"), ("nll", "NLL"), ("ece", "ECE"), ("epistemic", "epistemic"),
            ("grad_cosine_distance", "grad. cos. dist."))


def headline(summary: dict) -> str:
    """The paper's columns: clean test metrics beside cA / cNLL / cECE (each severity's sets pooled, averaged over severities)."""
    rows = [("test", "test"), ("val", "val"), ("corrupted", "corrupted (cA/cNLL/cECE)")]
    lines = [f"{'':26}" + "".join(f"{label:>18}" for _, label in HEADLINE)]
    for prefix, name in rows:
        if f"{prefix}/accuracy" in summary:
            lines.append(f"{name:26}" + "".join(f"{summary.get(f'{prefix}/{k}', float('nan')):18.4f}" for k, _ in HEADLINE))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> None:
    from forde.train import train

    cfg = load_config(args.config, args.overrides)
    results = train(cfg)
    print(headline(results["summary"]))
    print(f"run directory: {results['run_dir']} (results.json holds every metric)")


def cmd_eval(args: argparse.Namespace) -> None:
    from forde.train import evaluate_run

    results = evaluate_run(Path(args.run_dir), args.overrides, out_name=args.out)
    print(headline(results["summary"]))


def _dataset(args: argparse.Namespace):
    from forde.config import DataConfig
    from forde.data.registry import load_dataset

    return load_dataset(DataConfig(name=args.dataset, root=args.root))


def cmd_data_corrupt(args: argparse.Namespace) -> None:
    from forde.config import TrainConfig
    from forde.data.corrupted import GENERATION_SEED, check_source, corrupted_root, layout_for, record_source
    from forde.data.corrupted_sets import run_corrupt_command

    ds = _dataset(args)
    cfg = TrainConfig()
    cfg.data.root, cfg.eval.corrupted_root = args.root, args.out
    out = corrupted_root(cfg, ds)
    check_source(out, ds)
    report = run_corrupt_command(ds.test.inputs, ds.test.labels, out, None, GENERATION_SEED, args.corruptions,
                                 args.severities, layout_for(ds), args.workers, class_dirs=ds.class_names or None)
    record_source(out, ds, report.written, GENERATION_SEED)


def cmd_data_import(args: argparse.Namespace) -> None:
    from forde.data.imagefolder import import_folder

    out = import_folder(args.src, args.name, args.root)
    print(f"imported {args.src} as '{args.name}' into {out}; train on it with data.name={args.name}")


def cmd_data_pca(args: argparse.Namespace) -> None:
    from forde.config import DataConfig
    from forde.data.pca import run_pca_command

    run_pca_command(DataConfig(name=args.dataset, root=args.root))


def cmd_data_grid(args: argparse.Namespace) -> None:
    from forde.data.corrupted_sets import save_corruption_grid

    ds = _dataset(args)
    image = ds.test.inputs[args.index].permute(1, 2, 0).numpy()
    print(f"wrote {save_corruption_grid(image, args.out)}")


def cmd_report(args: argparse.Namespace) -> None:
    from forde.analysis.report import run

    run(args)


def cmd_config(args: argparse.Namespace) -> None:
    print(to_yaml(load_config(args.config, args.overrides)), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forde", description="First-order Repulsive Deep Ensembles")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    builtins = ", ".join(builtin_config_names())

    p = sub.add_parser("train", help="train one ensemble and write a run directory")
    p.add_argument("config", help=f"a YAML file or a built-in config ({builtins})")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.alpha=0.4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a run directory's checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="eval.* / device overrides, e.g. eval.corruptions=[none]")
    p.add_argument("--out", default="results.json", help="file name written in the run directory")
    p.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    root_default = os.environ.get("FORDE_DATA", "data")
    p = data.add_parser("import-folder", help="turn an ImageFolder tree (SRC/train/<class>/*, SRC/test/<class>/*) "
                                              "into a dataset that data.name=NAME loads")
    p.add_argument("src")
    p.add_argument("name")
    p.add_argument("--root", default=root_default, help="data root (default: $FORDE_DATA or ./data)")
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
    p.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
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
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except ConfigError as err:
        print(f"forde: config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a run directory that cannot be read back: one line with the fix, no traceback
        train = sys.modules.get("forde.train")  # (only commands that imported it can raise it)
        if train is None or not isinstance(err, train.RunDirError):
            raise
        print(f"forde: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
