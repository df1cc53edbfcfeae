"""Analysis on results of real tiny training runs: loaders (run directories, Optuna storage), tables
against the inputs' means and stds, the paper's numbers side by side, and the report's outputs."""

import dataclasses
import json
import runpy
import shutil
import statistics
import sys
from pathlib import Path

import optuna
import pytest
import torch

from forde.analysis import figures
from forde.analysis.aggregate import Setting, setting_of
from forde.analysis.report import duration, wall_clock
from forde.analysis.results import architecture, find_runs, load_optuna, load_run_dir, study_runs
from forde.analysis.tables import benchmark_table, difference_table, to_latex, to_markdown
from forde.cli import main as cli
from forde.config import load_config
from forde.data.base import Split
from forde.data.corrupted import CorruptedSet
from forde.train import train

SCRIPT = Path(__file__).resolve().parents[1] / "analysis" / "report.py"
VARIANTS = [
    ("de", None),
    ("forde", 0.0),
    ("forde", 0.5),
    ("forde", 1.0),
    ("rde_weight", None),
    ("rde_function", None),
    ("lit", None),
]
SETTING = Setting("digits", "mlp", 3)


def corrupted_digits(setup):
    """Two corruption types x five severities of the digits test split, made here (no -C set needed)."""
    test = setup.dataset.test
    x = test.inputs.float()
    g = torch.Generator().manual_seed(0)
    made_here = {"source": "generated", "generator": "test", "seed": 0}
    for severity in range(1, 6):
        noisy = Split(
            (x + torch.randn(x.shape, generator=g) * 25.0 * severity).clamp(0, 255).round().to(torch.uint8), test.labels
        )
        yield CorruptedSet("gaussian_noise", severity, lambda s=noisy: s, made_here)
        faded = Split(
            ((x - x.mean()) * (1 - 0.18 * severity) + x.mean()).clamp(0, 255).round().to(torch.uint8), test.labels
        )
        yield CorruptedSet("contrast", severity, lambda s=faded: s, made_here)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """STUDY/runs/<name>/: 7 variants x 2 seeds at M = 3, and DE at M = 2; one epoch each."""
    root = tmp_path_factory.mktemp("study")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs: threads only add overhead
    jobs = [(m, a, 3, s) for m, a in VARIANTS for s in (0, 1)] + [("de", None, 2, s) for s in (0, 1)]
    for method, alpha, size, seed in jobs:
        name = f"{method}{'' if alpha is None else f'-a{alpha}'}-M{size}-s{seed}"
        overrides = [
            f"run.out_dir={root / 'runs'}",
            f"run.name={name}",
            "run.progress=false",
            f"ensemble_size={size}",
            "model.hidden=[16]",
            "optim.epochs=1",
            f"data.root={root / 'data'}",
            "eval.grad_samples=100",
            f"method.name={method}",
            f"seed={seed}",
        ] + ([f"method.alpha={alpha}"] if alpha is not None else [])
        train(load_config("quickstart", overrides), corrupted_sets=corrupted_digits)
    torch.set_num_threads(threads)
    return root


def raw_results(study, pattern):
    return [json.loads(p.read_text()) for p in sorted((study / "runs").glob(f"{pattern}/results.json"))]


def test_run_directories_load_with_variants_and_per_corruption_rows(study):
    runs = find_runs(study)
    assert len(runs) == 16
    assert {r.variant for r in runs} == {
        "DE",
        "FoRDE-Identity",
        "FoRDE-Tuned (α=0.5)",
        "FoRDE-PCA",
        "Weight-RDE",
        "Function-RDE",
        "LIT",
    }
    run = load_run_dir(study / "runs" / "forde-a0.5-M3-s1")
    assert (run.method, run.alpha, run.seed, run.ensemble_size, run.model) == ("forde", 0.5, 1, 3, "mlp")
    assert run.summary == raw_results(study, "forde-a0.5-M3-s1")[0]["summary"]
    assert len(run.per_set) == 10 and {"corruption", "severity", "accuracy"} <= set(run.per_set[0])


def test_a_run_whose_config_is_not_a_mapping_is_skipped_with_a_reason(tmp_path, caplog):
    run = tmp_path / "runs" / "bad"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"method": "de", "summary": {}}))
    (run / "config.yaml").write_text("- a list\n- not a config\n")
    with pytest.raises(ValueError, match="config.yaml holds a list, not a mapping"):
        load_run_dir(run)
    assert find_runs(tmp_path) == [] and "skipping" in caplog.text


@pytest.mark.parametrize(
    "variant,pattern,key",
    [
        ("DE", "de-M3-s*", "test/nll"),
        ("FoRDE-PCA", "forde-a1.0-M3-s*", "corrupted/accuracy"),
        ("LIT", "lit-M3-s*", "test/ece"),
    ],
)
def test_table_cells_are_means_and_stds_over_seeds(study, variant, pattern, key):
    runs = [r for r in find_runs(study) if setting_of(r) == SETTING]
    table = benchmark_table(runs, SETTING)
    values = [res["summary"][key] for res in raw_results(study, pattern)]
    cell = table.value(variant, key)
    assert cell.n == 2
    assert cell.mean == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert cell.std == pytest.approx(statistics.stdev(values), abs=1e-12)
    column = next(c for c in table.columns if c.key == key)
    assert f"{column.fmt(cell.mean)} ± {column.fmt(cell.std)}" in to_markdown(table)


@pytest.mark.parametrize(
    "variant,pattern,key,column",
    [
        ("FoRDE-PCA", "forde-a1.0-M3", "corrupted/accuracy", "Δ cA (%) ↑"),
        ("LIT", "lit-M3", "test/nll", "Δ NLL ↓"),
    ],
)
def test_differences_to_de_are_paired_by_seed(study, variant, pattern, key, column):
    runs = [r for r in find_runs(study) if setting_of(r) == SETTING]
    text = difference_table(runs, SETTING)
    diffs = [
        raw_results(study, f"{pattern}-s{seed}")[0]["summary"][key]
        - raw_results(study, f"de-M3-s{seed}")[0]["summary"][key]
        for seed in (0, 1)
    ]
    scale = 100.0 if "%" in column else 1.0
    digits = 1 if "%" in column else 3
    mean, std = statistics.fmean(diffs) * scale, statistics.stdev(diffs) * scale
    better = sum(d > 0 if key == "corrupted/accuracy" else d < 0 for d in diffs)
    head, *_, row = [line for line in text.splitlines() if line.startswith(("| Method", f"| {variant} |"))]
    cell = row.split(" | ")[head.split(" | ").index(column)]
    mark = "†" if key.startswith("corrupted/") else ""  # the fixture's corrupted sets are made here
    assert cell == f"{'+' if mean >= 0 else '−'}{abs(mean):.{digits}f} ± {std:.{digits}f} ({better}/2){mark}"
    assert "| DE |" not in text  # the baseline is not compared with itself
    assert difference_table([r for r in runs if r.variant != "DE"], SETTING) is None


def test_one_seed_shows_its_value_without_a_spread(study):
    runs = [r for r in find_runs(study) if setting_of(r) == SETTING and r.seed == 0]
    [nll] = raw_results(study, "de-M3-s0")
    line = next(line for line in to_markdown(benchmark_table(runs, SETTING)).splitlines() if line.startswith("| DE |"))
    assert (
        line.startswith(f"| DE | 1 | {nll['summary']['test/nll']:.3f} |")
        or f"| **{nll['summary']['test/nll']:.3f}** |" in line
    )
    assert "±" not in line and "±" not in difference_table(runs, SETTING).split("\n\n")[1]


def test_best_mean_is_bold_and_latex_escapes(study):
    runs = [r for r in find_runs(study) if setting_of(r) == SETTING]
    table = benchmark_table(runs, SETTING)
    acc = next(c for c in table.columns if c.key == "test/accuracy")
    best = max(table.rows, key=lambda r: r.cells[acc.key].mean)
    line = next(line for line in to_markdown(table).splitlines() if line.startswith(f"| {best.variant} |"))
    assert f"**{acc.fmt(best.cells[acc.key].mean)} ± " in line
    tex = to_latex(table)
    assert r"\textbf{" in tex and r"$\alpha$=0.5" in tex and r"Accuracy (\%)" in tex and "±" not in tex


def test_paper_numbers_appear_beside_ours(study):
    runs = [
        dataclasses.replace(r, dataset="cifar10", model="resnet18") for r in find_runs(study) if r.ensemble_size == 3
    ]
    table = benchmark_table(runs, Setting("cifar10", "resnet18", 3), paper=True)
    assert table.paper_source == "Table 2"
    rows = {r.variant: r for r in table.rows}
    assert rows["FoRDE-PCA"].paper["corrupted/accuracy"] == "80.5"
    assert rows["Feature-RDE"].seeds == 0 and rows["Feature-RDE"].paper["test/accuracy"] == "96.4"
    # the paper's FoRDE-Tuned is its alpha = 0.2 on CIFAR-10: not beside our 0.5, but a row of its own
    assert rows["FoRDE-Tuned (α=0.5)"].paper == {} and rows["FoRDE-Tuned (α=0.5)"].seeds == 2
    assert rows["FoRDE-Tuned (α=0.2)"].seeds == 0 and rows["FoRDE-Tuned (α=0.2)"].paper["test/nll"] == "0.114"
    md = to_markdown(table)
    assert "The paper's Table 2 (Trinh et al., 2024):" in md and "Trinh et al. (2024) report in Table 2" in md
    ours, theirs = md.split("The paper's Table 2")
    assert "| Feature-RDE |" in theirs and "| Feature-RDE |" not in ours  # our table: only what ran here
    assert "The paper's FoRDE-Tuned is its α = 0.2 (appendix D.4), so it stands beside our runs at that α only." in md
    assert to_latex(table).startswith(r"\begin{table*}")
    at_paper_alpha = [dataclasses.replace(r, alpha=0.2) if r.alpha == 0.5 else r for r in runs]
    rows = {r.variant: r for r in benchmark_table(at_paper_alpha, Setting("cifar10", "resnet18", 3), paper=True).rows}
    assert rows["FoRDE-Tuned (α=0.2)"].seeds == 2 and rows["FoRDE-Tuned (α=0.2)"].paper["test/nll"] == "0.114"


def test_optuna_storage_loader(study, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    opt = optuna.create_study(study_name="forde-alpha", storage=storage, direction="maximize")
    dirs = sorted((study / "runs").glob("forde-a*-M3-s0"))
    dist = {"method.alpha": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for d in dirs:
        res = json.loads((d / "results.json").read_text())
        opt.add_trial(
            optuna.trial.create_trial(
                params={"method.alpha": load_run_dir(d).alpha},
                distributions=dist,
                value=res["summary"]["test/accuracy"],
                user_attrs={"run_dir": str(d), "summary": res["summary"]},
            )
        )
    gone = json.loads((dirs[0] / "results.json").read_text())["summary"]  # a trial whose run directory was deleted
    opt.add_trial(
        optuna.trial.create_trial(
            params={"method.alpha": 0.3},
            distributions=dist,
            value=0.5,
            user_attrs={
                "run_dir": str(tmp_path / "deleted"),
                "summary": gone,
                "config_params": {"method.name": "forde", "method.alpha": 0.3, "seed": 4},
            },
        )
    )
    opt.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED,
            params={"method.alpha": 0.9},
            distributions=dist,
            intermediate_values={1: 0.1},
        )
    )
    opt.add_trial(
        optuna.trial.create_trial(  # an interrupted attempt, whose retry finished in the same directory
            state=optuna.trial.TrialState.FAIL,
            params={"method.alpha": load_run_dir(dirs[0]).alpha},
            distributions=dist,
            user_attrs={"run_dir": str(dirs[0]), "failure": "interrupted"},
        )
    )
    opt.set_user_attr("data.name", "digits")

    runs = load_optuna(storage)
    assert len(runs) == 4  # three run directories (each once), one summary-only trial; the pruned has no results
    from_dirs = {r.source: r for r in find_runs(study)}
    for r in runs[:3]:
        assert r.summary == from_dirs[r.source].summary and r.per_set == from_dirs[r.source].per_set
    orphan = runs[3]
    assert orphan.source.startswith("optuna:forde-alpha#")
    assert (orphan.method, orphan.alpha, orphan.seed, orphan.dataset) == ("forde", 0.3, 4, "digits")
    assert orphan.variant == "FoRDE-Tuned (α=0.3)" and orphan.model == "unknown"
    assert orphan.summary == gone and orphan.per_set == []

    # a study folder: run directories are the record; the storage adds only trials whose directories are gone
    shutil.copy(tmp_path / "study.db", study / "study.db")
    try:
        combined = study_runs(study)
    finally:
        (study / "study.db").unlink()
    assert len(combined) == 17 and sum(r.source.startswith("optuna:") for r in combined) == 1


def test_figures_without_their_inputs_are_skipped_with_a_reason(study):
    de_only = [r for r in find_runs(study) if r.method == "de" and r.ensemble_size == 3]
    with pytest.raises(figures.Skip, match="two or more values of method.alpha"):
        figures.lengthscale_figure(de_only, SETTING)
    with pytest.raises(figures.Skip, match="two or more ensemble sizes"):
        figures.ensemble_size_figure(de_only, "MLP / Digits")
    clean = [
        dataclasses.replace(r, summary={k: v for k, v in r.summary.items() if k.startswith("test/")}, per_set=[])
        for r in de_only
    ]
    with pytest.raises(figures.Skip, match="no corrupted results"):
        figures.severity_figure(clean, SETTING)
    with pytest.raises(figures.Skip, match="no per-corruption results"):
        figures.corruption_type_figure(clean, SETTING)


def test_report_script_writes_every_table_and_figure(study, tmp_path, monkeypatch):
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["report.py", str(study), "--out", str(out), "--paper"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code == 0
    expected = [
        f"digits-mlp-M3/{name}.{ext}"
        for name in ("benchmark", "severity", "corruptions", "diversity", "lengthscale")
        for ext in ("png", "pdf")
    ]
    expected += [
        "digits-mlp-M3/benchmark.md",
        "digits-mlp-M3/benchmark.tex",
        "digits-mlp-M3/differences.md",
        "digits-mlp-M2/benchmark.md",
        "digits-mlp/ensemble_size.png",
        "digits-mlp/ensemble_size.pdf",
        "index.md",
    ]
    for name in expected:
        assert (out / name).stat().st_size > 0, name
    index = (out / "index.md").read_text()
    assert "digits-mlp-M2/lengthscale: needs FoRDE runs at two or more values of method.alpha" in index
    results = raw_results(study, "*")
    train, evaluate = (duration(sum(r[f"{k}_time_s"] for r in results)) for k in ("train", "eval"))
    assert f"Compute: 16 runs trained for {train} and were evaluated in {evaluate}, summed over runs" in index
    assert [duration(s) for s in (42.0, 90.0, 5400.0)] == ["42.0 s", "1.5 min", "1.50 h"]


def test_forde_report_on_a_study_without_corruptions_skips_instead_of_crashing(study, tmp_path, capsys):
    for name in ("de-M3-s0", "de-M3-s1"):
        shutil.copytree(study / "runs" / name, tmp_path / "s" / name)
        path = tmp_path / "s" / name / "results.json"
        res = json.loads(path.read_text())
        res.pop("corrupted")
        res["summary"] = {k: v for k, v in res["summary"].items() if k.startswith("test/")}
        path.write_text(json.dumps(res))
    assert cli(["report", str(tmp_path / "s")]) == 0
    index = (tmp_path / "s" / "report" / "index.md").read_text()
    for skipped in ("severity: no corrupted results", "corruptions: no per-corruption results", "lengthscale: needs"):
        assert skipped in index
    assert (tmp_path / "s" / "report" / "digits-mlp-M3" / "benchmark.png").exists()
    assert "figures skipped" in capsys.readouterr().out


def test_numbers_on_regenerated_sets_and_old_set_mean_ece_are_marked(study, tmp_path):
    """The fixture's corrupted sets are made here: every corrupted cell carries †. Results written before
    provenance and pooled cECE (no corrupted/regenerated_sets, no corrupted/ece_set_mean) get * and, on
    cECE, ‡; the footnotes say what the marks mean."""
    runs = [r for r in find_runs(study) if setting_of(r) == SETTING]
    assert all(r.regenerated and not r.set_mean_cece for r in runs)
    md = to_markdown(benchmark_table(runs, SETTING))
    de = next(line for line in md.splitlines() if line.startswith("| DE |")).split(" | ")
    assert de[2].endswith(("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"))  # clean NLL: no mark
    assert all(cell.rstrip(" |").endswith("†") for cell in de[-3:])
    assert "† computed on corrupted sets generated here" in md and "‡" not in md
    old = [
        dataclasses.replace(
            r,
            summary={
                k: v for k, v in r.summary.items() if k not in ("corrupted/ece_set_mean", "corrupted/regenerated_sets")
            },
        )
        for r in runs
        if r.method == "de"
    ]
    assert all(r.regenerated is None and r.set_mean_cece for r in old)
    md = to_markdown(benchmark_table(old, SETTING))
    ca, cnll, cece = next(line for line in md.splitlines() if line.startswith("| DE |")).rstrip(" |").split(" | ")[-3:]
    assert ca.endswith("*") and cnll.endswith("*") and cece.endswith("*‡")
    assert "‡ cECE of results written before cECE pooled" in md and "* from results that do not record" in md
    tex = to_latex(benchmark_table(runs, SETTING))
    assert r"\dag{}" in tex and "†" not in tex


def test_other_network_sizes_are_other_settings(study):
    assert (
        architecture({"model": {"name": "resnet18", "width": 16, "blocks": [1, 1, 1, 1]}}) == "width 16, blocks 1-1-1-1"
    )
    assert architecture({"model.name": "resnet18", "model.width": 64}) == ""  # flat W&B configs, old configs
    assert architecture({"model": {"name": "mlp", "width": 16}}) == ""
    small = [
        dataclasses.replace(r, dataset="cifar10", model="resnet18", arch="width 16, blocks 1-1-1-1")
        for r in find_runs(study)
        if r.ensemble_size == 3
    ]
    setting = setting_of(small[0])
    assert setting != Setting("cifar10", "resnet18", 3)
    assert setting.title == "ResNet10, width 16 / CIFAR-10, M = 3"  # named by its depth, as the docs name it
    assert setting.slug == "cifar10-resnet18-width16-blocks1-1-1-1-M3"  # the folder committed docs link to
    md = to_markdown(benchmark_table(small, setting, paper=True))
    assert "(mean over 5 seeds, M = 10, 300 epochs, the full-size ResNet18; here: ResNet10, width 16, M = 3)" in md


def sampled_study(storage, name, directions, n, metric_names):
    """A study of n finished trials (values from a known function of the parameters), with per-epoch reports."""
    opt = optuna.create_study(study_name=name, storage=storage, directions=directions)
    opt.set_metric_names(metric_names)
    for _ in range(n):
        trial = opt.ask()
        alpha = trial.suggest_float("method.alpha", 0.0, 1.0)
        lr = trial.suggest_float("optim.lr", 0.01, 0.1, log=True)
        size = trial.suggest_categorical("ensemble_size", [3, 5])
        if len(directions) == 1:
            for epoch in (1, 2, 3):
                trial.report((alpha - 0.3) ** 2 + 1.0 / epoch, epoch)
        values = [(alpha - 0.3) ** 2 + lr + 0.01 * size, 1 - alpha * alpha]
        opt.tell(trial, values[: len(directions)])
    return opt


def test_forde_report_draws_each_optuna_study_with_its_best_trial_marked(tmp_path):
    import warnings

    from forde.analysis.study_figures import Objective, history_figure, parallel_figure, slice_figure
    from forde.sweep.storage import SweepStorage

    folder = tmp_path / "sweep"
    folder.mkdir()
    storage = SweepStorage(f"journal:{folder / 'journal.log'}").optuna  # a journal file where the launcher leaves it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = sampled_study(storage, "single", ["minimize"], 8, ["val/nll"])
        sampled_study(storage, "pareto", ["minimize", "maximize"], 8, ["val/nll", "corrupted/accuracy"])
        sampled_study(storage, "young", ["minimize"], 1, ["val/nll"])
    assert cli(["report", str(folder)]) == 0
    out = folder / "report" / "optuna"
    names = {
        "single": ["history", "importances", "parallel", "slice", "intermediate", "timeline"],
        "pareto": ["pareto", "timeline"]
        + [
            f"{kind}-{metric}"
            for kind in ("history", "importances", "parallel", "slice")
            for metric in ("val_nll", "corrupted_accuracy")
        ],
        "young": ["history", "parallel", "slice", "intermediate", "timeline"],
    }
    for study, figures_ in names.items():
        for name in figures_:
            for ext in ("png", "pdf"):
                assert (out / study / f"{name}.{ext}").stat().st_size > 0, (study, name, ext)
    index = (folder / "report" / "index.md").read_text()
    assert "optuna/young/importances: needs 2 completed trials, the study has 1" in index
    span = max(t.datetime_complete for t in single.trials) - min(t.datetime_start for t in single.trials)
    assert wall_clock(single) == span.total_seconds() > 0
    assert f"Wall clock: study single ran for {duration(span.total_seconds())}, from its first trial's start" in index

    best = single.best_trial
    objective = Objective(single, 0)
    label = f"best: trial {best.number} (val/nll = {best.value:.4g})"
    for draw in (history_figure, parallel_figure):
        fig = draw(single, objective)
        assert label in [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    fig = slice_figure(single, objective)
    stars = [c for ax in fig.axes for c in ax.collections if hasattr(c, "get_sizes") and list(c.get_sizes()) == [160]]
    assert len(stars) == 3 and all(s.get_offsets()[0][1] == best.value for s in stars)  # one per parameter
