"""Everything the runs of a study support, in one command: tables (Markdown + LaTeX) and figures
(PNG + PDF) per setting, and an index.md that lists them and says which figures were skipped and why.

Layout:  OUT/<dataset>-<model>-M<size>/{benchmark, cost, calibration, ood-msp, ood-mi}.{md,tex}, differences.md,
         {benchmark, severity, corruptions, diversity, lengthscale, reliability}.{png,pdf}
         OUT/<dataset>-<model>/ensemble_size.{png,pdf}
         OUT/optuna/<study>/{history, importances, parallel, slice, intermediate | pareto, timeline}.{png,pdf}
         OUT/index.md
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from forde.analysis import figures, style
from forde.analysis.aggregate import Setting, distinguish, group, setting_of
from forde.analysis.results import Run, load_wandb, optuna_studies, study_runs
from forde.analysis.study_figures import study_figures
from forde.analysis.tables import (
    CALIBRATED,
    OOD_SCORE_NAMES,
    benchmark_table,
    cost_table,
    difference_table,
    metric_table,
    ood_columns,
    to_latex,
    to_markdown,
)
from forde.errors import ConfigError
from forde.names import RULE, is_path_component

log = logging.getLogger(__name__)

SETTING_FIGURES: dict[str, Callable] = {
    "severity": figures.severity_figure,
    "corruptions": figures.corruption_type_figure,
    "diversity": figures.diversity_figure,
    "lengthscale": figures.lengthscale_figure,
    "reliability": figures.reliability_figure,
}


@dataclass
class Report:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (output, reason)

    def figure(self, path: Path, draw: Callable, *args) -> None:
        try:
            fig = draw(*args)
        except figures.Skip as why:
            log.info("skipping %s: %s", path, why)
            self.skipped.append((str(path), str(why)))
            return
        self.written += style.save(fig, path)

    def text(self, path: Path, content: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        self.written.append(path)


def make_report(runs: list[Run], out: Path, paper: bool = False, studies: Sequence[optuna.Study] = ()) -> Report:
    report = Report()
    if not runs:
        log.warning("no finished runs found: nothing to report")
    distinguish(runs)
    for setting, runs_here in sorted(group(runs, setting_of).items()):
        folder = out / setting.slug
        table = benchmark_table(runs_here, setting, paper)
        report.text(folder / "benchmark.md", to_markdown(table))
        report.text(folder / "benchmark.tex", to_latex(table))
        differences = difference_table(runs_here, setting)
        if differences:
            report.text(folder / "differences.md", differences)
        extra = {
            "cost": cost_table(runs_here, setting),
            "calibration": metric_table(runs_here, setting, CALIBRATED, "calibration and abstention"),
        }
        for score in ("msp", "mi"):
            extra[f"ood-{score}"] = metric_table(
                runs_here, setting, ood_columns(runs_here, score), f"OOD detection by {OOD_SCORE_NAMES[score]}"
            )
        for name, extra_table in extra.items():
            if extra_table is not None:
                report.text(folder / f"{name}.md", to_markdown(extra_table))
                report.text(folder / f"{name}.tex", to_latex(extra_table))
        report.figure(folder / "benchmark", figures.benchmark_figure, table, runs_here)
        for name, draw in SETTING_FIGURES.items():
            report.figure(folder / name, draw, runs_here, setting)
    for (dataset, model, arch), runs_here in sorted(group(runs, lambda r: (r.dataset, r.model, r.arch)).items()):
        every_size = Setting(dataset, model, 0, arch)
        title = every_size.title.rsplit(", M = ", 1)[0]
        report.figure(
            out / every_size.slug.rsplit("-M", 1)[0] / "ensemble_size", figures.ensemble_size_figure, runs_here, title
        )
    for opt in studies:
        for name, draw, args in study_figures(opt):
            report.figure(out / "optuna" / opt.study_name / name, draw, *args)
    report.text(out / "index.md", _index(report, out, runs, studies))
    return report


def duration(seconds: float) -> str:
    return (
        f"{seconds:.1f} s"
        if seconds < 60
        else f"{seconds / 60:.1f} min"
        if seconds < 3600
        else f"{seconds / 3600:.2f} h"
    )


def wall_clock(study: optuna.Study) -> float | None:
    """Seconds from the study's first trial start to its last trial end: what a launch took, stops included."""
    spans = [
        (t.datetime_start, t.datetime_complete)
        for t in study.get_trials(deepcopy=False)
        if t.datetime_start is not None and t.datetime_complete is not None
    ]
    if not spans:
        return None
    return (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()


def _index(report: Report, out: Path, runs: list[Run], studies: Sequence[optuna.Study] = ()) -> str:
    lines = [f"# Report ({len(runs)} runs)", ""]
    for study in studies:
        if (seconds := wall_clock(study)) is not None:
            lines += [
                f"Wall clock: study {study.study_name} ran for {duration(seconds)}, from its first trial's start to "
                "its last trial's end (Optuna's records; stops and restarts included).",
                "",
            ]
    timed = [r for r in runs if "train" in r.seconds and "eval" in r.seconds]
    if timed:
        train, evaluate = (duration(sum(r.seconds[k] for r in timed)) for k in ("train", "eval"))
        lines += [
            f"Compute: {len(timed)} runs trained for {train} and were evaluated in {evaluate}, summed over "
            "runs (each run's train_time_s and eval_time_s in results.json).",
            "",
        ]
    lines += ["## Written", ""]
    lines += [f"- {p.relative_to(out)}" for p in report.written]
    if report.skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {Path(p).relative_to(out)}: {why}" for p, why in report.skipped]
    return "\n".join(lines) + "\n"


def named_safely(runs: list[Run], studies: list[optuna.Study]) -> tuple[list[Run], list[optuna.Study]]:
    """The runs and studies whose names can become folders of the report: dataset, model and study names
    come from run directories and storages others may have written, and must stay inside OUT."""
    kept_runs, kept_studies = [], []
    for r in runs:
        if is_path_component(setting_of(r).slug):
            kept_runs.append(r)
        else:
            log.warning("skipping %s: its dataset and model name %r %s", r.source, setting_of(r).slug, RULE)
    for s in studies:
        if is_path_component(s.study_name):
            kept_studies.append(s)
        else:
            log.warning("skipping the figures of Optuna study %r: its name %s", s.study_name, RULE)
    return kept_runs, kept_studies


def run(args: argparse.Namespace) -> Report:
    from forde.sweep.folder import find_url

    if not args.study_dir.is_dir() and not args.wandb:
        raise ConfigError(
            f"{args.study_dir} is not a folder; give a study folder (e.g. studies/quickstart) or a folder of run "
            "directories"
        )
    storage = args.storage or find_url(args.study_dir)  # looked up once (it may log where the study's storage is)
    runs = study_runs(args.study_dir, storage, args.study_name)
    if args.wandb:
        runs += load_wandb(args.wandb)
    out = args.out or args.study_dir / "report"
    runs, studies = named_safely(runs, optuna_studies(args.study_dir, storage, args.study_name))
    report = make_report(runs, out, args.paper, studies)
    print(
        f"{len(report.written)} files written to {out}; {len(report.skipped)} figures skipped (see {out / 'index.md'})"
    )
    return report
