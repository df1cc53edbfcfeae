"""The report's tables on run directories with known numbers (written here, no training): seeds counted once,
archived attempts left out, the same marks in both tables, the paper's tuned row at its own alpha, no "−0.000"."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from forde.analysis.aggregate import distinguish, setting_of
from forde.analysis.results import find_runs
from forde.analysis.tables import benchmark_table, cost_table, difference_table, to_markdown


def write_run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    summary: dict,
    alpha: float | None = None,
    per_set: list[dict] | None = None,
    size: int = 4,
    seconds: tuple[float, float] = (300.0, 200.0),
    method_keys: dict | None = None,
) -> Path:
    """One run directory as `forde train` leaves it (only what the report reads): a ResNet18 of width 16 on CIFAR-10."""
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    config = {
        "seed": seed,
        "ensemble_size": size,
        "data": {"name": "cifar10"},
        "model": {"name": "resnet18", "width": 16, "blocks": [1, 1, 1, 1]},
        "method": {"name": method, "alpha": 1.0 if alpha is None else alpha, **(method_keys or {})},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"summary": summary, "train_time_s": seconds[0], "eval_time_s": seconds[1]}
    if per_set:
        results["corrupted"] = {"per_set": per_set}
    (run / "results.json").write_text(json.dumps(results))
    return run


def summary(
    accuracy: float,
    nll: float = 1.0,
    ece: float = 0.05,
    corrupted: float | None = None,
    pooled_cece: bool = True,
    recorded: bool = True,
) -> dict:
    """Clean metrics, and corrupted ones (cA = `corrupted`) as a run writes them: pooled cECE beside the per-set mean
    (`pooled_cece`), the count of corrupted sets generated here (`recorded`)."""
    out = {"test/accuracy": accuracy, "test/nll": nll, "test/ece": ece}
    if corrupted is not None:
        out.update({"corrupted/accuracy": corrupted, "corrupted/nll": nll + 0.5, "corrupted/ece": ece / 2})
        if pooled_cece:
            out["corrupted/ece_set_mean"] = ece
        if recorded:
            out["corrupted/regenerated_sets"] = 95
    return out


def tables(root: Path, paper: bool = False) -> tuple[str, str | None]:
    runs = find_runs(root)
    setting = setting_of(runs[0])
    return to_markdown(benchmark_table(runs, setting, paper)), difference_table(runs, setting)


def row(markdown: str, variant: str, paper: bool = False) -> dict[str, str]:
    """A table row's cells, by the column names of its header: of our table, or of the paper's that follows it."""
    if "The paper's Table" in markdown:
        markdown = markdown.split("The paper's Table")[paper]
    lines = markdown.splitlines()
    head = next(line for line in lines if line.startswith("| Method"))
    cells = next(line for line in lines if line.startswith(f"| {variant} |"))
    return dict(zip(head.strip("| ").split(" | "), cells.strip("| ").split(" | ")))


def test_seeds_are_distinct_seeds_with_one_value_each_in_both_tables(tmp_path):
    """DE ran seed 0 twice (80 and 90 %) and seed 1 once (85 %): two seeds, 85.0 each, not three samples with
    a spread of 5 points; the difference table pairs the same per-seed values."""
    write_run(tmp_path, "de-s0", "de", 0, summary(0.80, corrupted=0.70))
    write_run(tmp_path, "de-s0-rerun", "de", 0, summary(0.90, corrupted=0.70))
    write_run(tmp_path, "de-s1", "de", 1, summary(0.85, corrupted=0.70))
    write_run(tmp_path, "lit-s0", "lit", 0, summary(0.86, corrupted=0.72))
    write_run(tmp_path, "lit-s1", "lit", 1, summary(0.88))  # no corrupted results: cA from seed 0 alone
    benchmark, differences = tables(tmp_path)
    de, lit = row(benchmark, "DE"), row(benchmark, "LIT")
    assert (de["Seeds"], de["Accuracy (%) ↑"]) == ("2", "85.0 ± 0.0")
    assert (lit["Seeds"], lit["Accuracy (%) ↑"], lit["cA (%) ↑"]) == ("2", "**87.0 ± 1.4**", "**72.0** (n=1)†")
    assert "(n=" not in de["cA (%) ↑"]
    assert "runs repeated at one seed count once, as their mean" in benchmark
    lit = row(differences, "LIT")  # 86 - 85 and 88 - 85: the same per-seed means as the benchmark table
    assert (lit["Seeds"], lit["Δ Accuracy (%) ↑"], lit["Δ cA (%) ↑"]) == ("2", "+2.0 ± 1.4 (2/2)", "+2.0 (1/1)†")
    assert "runs repeated at one seed count once, as their mean" in differences


def test_attempts_archived_by_a_restart_are_not_runs(tmp_path):
    run = write_run(tmp_path / "runs", "trial-0000", "de", 0, summary(0.85))
    write_run(run, "previous-1", "de", 0, summary(0.10))  # the attempt that run.restart=true moved aside
    write_run(run, "previous-2", "de", 0, summary(0.20))
    runs = find_runs(tmp_path)
    assert [r.source for r in runs] == [str(run)]
    assert len(find_runs(run / "previous-1")) == 1  # pointed at directly, an archive is read like any run directory


def test_differences_carry_the_benchmark_marks_and_footnotes(tmp_path):
    """An old DE result (per-set-mean cECE, no record of where its corrupted sets came from) against a new LIT one:
    every corrupted difference is marked as the benchmark cells are, and Δ cECE says it mixes the two cECEs."""
    for seed in (0, 1):
        write_run(tmp_path, f"de-s{seed}", "de", seed, summary(0.85, corrupted=0.70, pooled_cece=False, recorded=False))
        write_run(tmp_path, f"lit-s{seed}", "lit", seed, summary(0.86 + seed / 100, corrupted=0.72))
    benchmark, differences = tables(tmp_path)
    assert row(benchmark, "DE")["cECE ↓"].endswith("*‡") and row(benchmark, "LIT")["cECE ↓"].endswith("†")
    lit = row(differences, "LIT")
    assert lit["Δ cA (%) ↑"].endswith("†*") and lit["Δ cNLL ↓"].endswith("†*") and lit["Δ cECE ↓"].endswith("†*‡")
    assert not lit["Δ Accuracy (%) ↑"].endswith(("†", "*", "‡"))
    for mark in (
        "† computed on corrupted sets generated here",
        "* from results that do not record",
        "‡ cECE of results written before cECE pooled",
    ):
        assert mark in benchmark and mark in differences
    assert "A Δ cECE marked ‡ may set a per-set mean against a pooled cECE" in differences


def test_the_papers_tuned_row_stands_beside_its_own_alpha_only(tmp_path):
    write_run(tmp_path, "de", "de", 0, summary(0.85))
    write_run(tmp_path, "tuned-0.4", "forde", 0, summary(0.85), alpha=0.4)
    benchmark, _ = tables(tmp_path, paper=True)
    assert row(benchmark, "FoRDE-Tuned (α=0.4)")["Seeds"] == "1"
    assert "| FoRDE-Tuned (α=0.4) |" not in benchmark.split("The paper's Table")[1]
    # CIFAR-10's tuned alpha in the paper: a row of the paper's table only
    assert row(benchmark, "FoRDE-Tuned (α=0.2)", paper=True)["NLL ↓"] == "0.114"
    assert "| FoRDE-Tuned (α=0.2) |" not in benchmark.split("The paper's Table")[0]
    assert (
        "The paper's FoRDE-Tuned is its α = 0.2 (appendix D.4), so it stands beside our runs at that α only."
        in benchmark
    )
    write_run(tmp_path, "tuned-0.2", "forde", 0, summary(0.85), alpha=0.2)
    benchmark, _ = tables(tmp_path, paper=True)
    ours = row(benchmark, "FoRDE-Tuned (α=0.2)")
    assert (ours["Seeds"], row(benchmark, "FoRDE-Tuned (α=0.2)", paper=True)["NLL ↓"]) == ("1", "0.114")


def test_a_difference_that_rounds_to_zero_has_no_sign_and_the_note_says_how_numbers_are_made(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, f"de-s{seed}", "de", seed, summary(0.85, ece=0.05000))
        write_run(tmp_path, f"lit-s{seed}", "lit", seed, summary(0.85, ece=0.04996 + seed * 0.00002))
    benchmark, differences = tables(tmp_path, paper=True)
    assert row(differences, "LIT")["Δ ECE ↓"] == "0.000 ± 0.000 (2/2)"
    assert "−0.000" not in differences and "-0.000" not in benchmark
    assert "Mean ± sample standard deviation over seeds (n − 1 denominator" in benchmark
    assert (
        "(mean over 5 seeds, M = 10, 300 epochs, the full-size ResNet18; here: ResNet10, width 16, M = 4)" in benchmark
    )


def test_runs_whose_configurations_differ_beyond_the_seed_are_separate_rows(tmp_path):
    """A sweep's trials (one seed, other learning rates) are not samples of one row: each is a row of its own,
    named by what sets it apart, with its own numbers."""

    for i, (lr, nll) in enumerate([(0.01, 0.770), (0.1, 1.585)]):
        run = write_run(tmp_path, f"trial-{i}", "forde", 0, summary(0.8, nll=nll))
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["optim"] = {"lr": lr, "epochs": 12}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    write_run(tmp_path, "de-0", "de", 0, summary(0.7, nll=1.0))
    write_run(tmp_path, "de-1", "de", 1, summary(0.7, nll=1.2))  # differs in its seed only: one row
    runs = find_runs(tmp_path)
    distinguish(runs)
    table = benchmark_table(runs, setting_of(runs[0]), paper=False)
    rows = {r.variant: (r.seeds, r.cells["test/nll"].mean) for r in table.rows}
    assert rows == {
        "DE": (2, 1.1),
        "FoRDE-PCA [optim.lr=0.01]": (1, 0.770),
        "FoRDE-PCA [optim.lr=0.1]": (1, 1.585),
    }


def test_a_run_of_unknown_seed_is_a_sample_of_its_own_and_pairs_with_none(tmp_path):
    for name, method, nll in [("a", "forde", 0.5), ("b", "forde", 0.7), ("c", "de", 0.9)]:
        run = write_run(tmp_path, name, method, 0, summary(0.8, nll=nll))
        config = yaml.safe_load((run / "config.yaml").read_text())
        del config["seed"]  # e.g. a W&B run, or a run directory from elsewhere, whose config lacks it
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    runs = find_runs(tmp_path)
    assert {r.seed for r in runs} == {None}
    table = benchmark_table(runs, setting_of(runs[0]), paper=False)
    forde_row = next(r for r in table.rows if r.variant == "FoRDE-PCA")
    assert forde_row.seeds == 2 and abs(forde_row.cells["test/nll"].mean - 0.6) < 1e-12
    assert difference_table(runs, setting_of(runs[0])) is None  # nothing to pair with DE


def test_the_report_has_calibration_and_ood_tables_and_reliability_diagrams(tmp_path):
    from forde.analysis.report import make_report
    from forde.calibration import reliability_curve

    g = torch.Generator().manual_seed(0)
    for method, seed, shift in [("de", 0, 0.0), ("de", 1, 0.01), ("forde", 0, 0.05), ("forde", 1, 0.06)]:
        extra = {"test/ts/nll": 0.9 - shift, "test/ts/ece": 0.02, "test/ts/brier": 0.3, "test/brier": 0.35}
        extra |= {"test/aurc": 0.1 - shift, "test/augrc": 0.05}
        extra |= {f"ood/svhn/{m}_{s}": 0.8 + shift for m in ("auroc", "fpr95") for s in ("msp", "mi")}
        run = write_run(tmp_path / "runs", f"{method}-{seed}", method, seed, {**summary(0.8), **extra})
        results = json.loads((run / "results.json").read_text())
        lp = torch.randn(200, 10, generator=g).log_softmax(-1)
        y = torch.randint(0, 10, (200,), generator=g)
        results["curves"] = {
            "test": {"reliability": reliability_curve(lp, y), "ts/reliability": reliability_curve(lp, y)}
        }
        (run / "results.json").write_text(json.dumps(results))
    runs = find_runs(tmp_path / "runs")
    report = make_report(runs, tmp_path / "report")
    folder = tmp_path / "report" / setting_of(runs[0]).slug
    calibration = (folder / "calibration.md").read_text()
    assert "calibration and abstention" in calibration and "NLL, TS ↓" in calibration
    assert "| FoRDE-PCA | 2 |" in calibration and "0.845 ± 0.007" in calibration  # 0.9 - 0.05, 0.9 - 0.06
    ood = (folder / "ood-mi.md").read_text()
    assert "OOD detection by mutual information" in ood and "svhn AUROC (%)" in ood and "85.5 ± 0.7" in ood
    assert (folder / "reliability.png").stat().st_size > 0 and folder / "reliability.png" in report.written


def test_runs_from_before_a_key_existed_share_a_row_with_runs_that_have_its_default(tmp_path):
    """An old run's config lacks keys added since (their defaults apply); evaluation settings do not split rows."""

    from forde.config import DataConfig

    old = write_run(tmp_path, "old", "de", 0, summary(0.7))
    new = write_run(tmp_path, "new", "de", 1, summary(0.8))
    config = yaml.safe_load((new / "config.yaml").read_text())
    config["data"]["max_image_pixels"] = DataConfig().max_image_pixels
    config["eval"] = {"ood": ["uniform_noise"], "calibrate": True}
    (new / "config.yaml").write_text(yaml.safe_dump(config))
    runs = find_runs(tmp_path)
    distinguish(runs)
    assert {r.variant for r in runs} == {"DE"} and old.name != new.name


def test_settings_of_other_methods_do_not_split_a_row(tmp_path):
    """A base config that sets, e.g., Feature-RDE's prior for CIFAR-100 does not split DE's runs made before it; a
    setting of the run's own method still does."""

    write_run(tmp_path, "old", "de", 0, summary(0.7))
    new = write_run(tmp_path, "new", "de", 1, summary(0.8))
    config = yaml.safe_load((new / "config.yaml").read_text())
    config["method"] |= {"feature_prior_scale": 0.005, "node_prior_std": 0.3, "alpha": 0.3}
    (new / "config.yaml").write_text(yaml.safe_dump(config))
    for seed, scale in ((0, 0.001), (1, 0.005)):
        run = write_run(tmp_path, f"feat-{seed}", "rde_feature", seed, summary(0.7))
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["method"]["feature_prior_scale"] = scale
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    runs = find_runs(tmp_path)
    distinguish(runs)
    assert sorted(r.variant for r in runs) == [
        "DE",
        "DE",
        "Feature-RDE [method.feature_prior_scale=0.001]",
        "Feature-RDE [method.feature_prior_scale=0.005]",
    ]


def set_config(run: Path, **keys) -> None:
    """Set dotted config keys of a run directory (`optim.lr=0.05`)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    for dotted, value in keys.items():
        *parents, last = dotted.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def test_a_sweeps_trials_are_labelled_by_every_setting_that_varied_rounded(tmp_path):
    """The quickstart's trials: each samples alpha, the bandwidth and the learning rate, so a row labelled by its alpha
    alone ("FoRDE-Tuned (α=0.131253)") would credit alpha with what the others did."""

    for name, alpha, bandwidth, lr in (
        ("t3", 0.13125339120858706, 1.64010010128287, 0.044350291467884134),
        ("t1", 0.1512301348454066, 1.7276385547059794, 0.05494682815178393),
    ):
        run = write_run(tmp_path, name, "forde", 0, summary(0.989), alpha=alpha)
        set_config(run, **{"method.bandwidth_scale": bandwidth, "optim.lr": lr})
    runs = find_runs(tmp_path)
    distinguish(runs)
    assert sorted(r.variant for r in runs) == [
        "FoRDE-Tuned (α=0.131) [method.bandwidth_scale=1.64, optim.lr=0.0444]",
        "FoRDE-Tuned (α=0.151) [method.bandwidth_scale=1.73, optim.lr=0.0549]",
    ]


def test_values_that_three_digits_cannot_tell_apart_get_more(tmp_path):

    for name, alpha in (("a", 0.13121), ("b", 0.13124)):
        write_run(tmp_path, name, "forde", 0, summary(0.9), alpha=alpha)
    runs = find_runs(tmp_path)
    distinguish(runs)
    assert sorted(r.variant for r in runs) == [
        "FoRDE-Tuned (α=0.131) [method.alpha=0.13121]",
        "FoRDE-Tuned (α=0.131) [method.alpha=0.13124]",
    ]


def test_a_network_is_named_by_its_depth_and_width_in_titles_but_not_in_folder_names(tmp_path):
    from torch import nn

    from forde.analysis.aggregate import network
    from forde.analysis.report import make_report
    from forde.models.preact import PreActResNet18
    from forde.models.resnet import ResNet18

    def depth(model: nn.Module) -> int:  # weighted layers on the main path: 3x3 convs and the classifier
        return sum(
            isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)) for m in model.modules()
        )

    for blocks in ((1, 1, 1, 1), (2, 2, 2, 2), (3, 4, 6, 3)):
        arch = "blocks " + "-".join(map(str, blocks))
        assert network("resnet18", arch) == f"ResNet{depth(ResNet18(10, 3, 8, blocks))}"
        assert network("preact_resnet18", arch) == f"PreActResNet{depth(PreActResNet18(10, 3, 8, blocks))}"
    assert network("resnet18", "width 16, blocks 1-1-1-1") == "ResNet10, width 16"
    assert (
        network("resnet18", "") == "ResNet18" and network("preact_resnet18", "width 32") == "PreActResNet18, width 32"
    )
    assert network("wrn16_4", "width 32") == "WideResNet16x4, width 32" and network("mlp", "") == "MLP"

    write_run(tmp_path / "runs", "de-0", "de", 0, summary(0.7, corrupted=0.5))
    write_run(tmp_path / "runs", "de-1", "de", 1, summary(0.72, corrupted=0.52))
    make_report(find_runs(tmp_path / "runs"), tmp_path / "report")
    folder = tmp_path / "report" / "cifar10-resnet18-width16-blocks1-1-1-1-M4"  # committed docs link to it
    assert (folder / "benchmark.md").read_text().startswith("### ResNet10, width 16 / CIFAR-10, M = 4\n")
    assert r"\caption{ResNet10, width 16 / CIFAR-10, M = 4." in (folder / "benchmark.tex").read_text()


def test_the_cost_table_pairs_each_variants_time_with_des_on_the_same_seed(tmp_path):
    """Exact FoRDE and FoRDE with the repulsion every 4th step against DE, two seeds each: training and evaluation
    time as multiples of DE's on the same seed beside accuracy and the corrupted metrics; a variant with no seed in
    common with DE has no ratio and no row."""
    times = {"de": (300.0, 200.0), "exact": (780.0, 210.0), "every4": (390.0, 200.0)}
    for seed in (0, 1):
        slower = 1 + seed / 3  # seed 1's machine was busier: every run of it took a third longer
        for name, (train, evaluate) in times.items():
            method, keys = ("de", {}) if name == "de" else ("forde", {"repulsion_every": 4 if name == "every4" else 1})
            if name == "every4" and seed == 1:
                train *= 1.2 / 1.3  # 1.2x DE on seed 1, 1.3x on seed 0
            write_run(
                tmp_path,
                f"{name}-s{seed}",
                method,
                seed,
                summary(0.85, corrupted=0.7 + seed / 100),
                seconds=(train * slower, evaluate * slower),
                method_keys=keys,
            )
    write_run(tmp_path, "lit-s2", "lit", 2, summary(0.9))  # no DE run of seed 2
    runs = find_runs(tmp_path)
    distinguish(runs)  # exact FoRDE and every 4th step: rows of their own, as the report names them
    table = to_markdown(cost_table(runs, setting_of(runs[0])))
    de, exact = row(table, "DE"), row(table, "FoRDE-PCA [method.repulsion_every=1]")
    every4 = row(table, "FoRDE-PCA [method.repulsion_every=4]")
    assert (de["Training time (× DE) ↓"], de["Evaluation time (× DE) ↓"]) == ("**1.00 ± 0.00**", "**1.00 ± 0.00**")
    assert exact["Training time (× DE) ↓"] == "2.60 ± 0.00" and exact["Evaluation time (× DE) ↓"] == "1.05 ± 0.00"
    assert every4["Training time (× DE) ↓"] == "1.25 ± 0.07" and every4["cA (%) ↑"] == "**70.5 ± 0.7**†"
    assert "LIT" not in table and "divided by DE's on the same seed" in table
    de_only = [r for r in runs if r.method == "de"]
    assert cost_table(de_only, setting_of(runs[0])) is None  # DE beside nothing is no comparison
