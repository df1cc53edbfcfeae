"""`forde train | eval | config | report`: thin wrappers over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from forde.config import ConfigError, builtin_config_names, load_config, to_yaml

log = logging.getLogger("forde")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cmd_train(args: argparse.Namespace) -> None:
    from forde.train import train

    cfg = load_config(args.config, args.overrides)
    results = train(cfg)
    print(json.dumps(results["summary"], indent=2))
    print(f"run directory: {results['run_dir']}")


def cmd_eval(args: argparse.Namespace) -> None:
    from forde.train import evaluate_run

    results = evaluate_run(Path(args.run_dir), args.overrides, out_name=args.out)
    print(json.dumps(results["summary"], indent=2))


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
