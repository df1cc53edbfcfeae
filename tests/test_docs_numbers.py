"""Every number the README and the reproduction page quote from the shipped report is the committed report's:
their table rows equal the report's, each "mean ± std" in their text is a cell of the report's tables, and the
compute hours are the ones the report's index sums. A write-up that drifts from its report fails here."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "paper_lite_cifar10"
SETTING = REPORT / "cifar10-resnet18-width16-blocks1-1-1-1-M4"
WRITE_UPS = [ROOT / "README.md", ROOT / "docs" / "reproducing.md", REPORT / "README.md"]
SPREAD = re.compile(r"[+−-]?\d+(?:\.\d+)? ± \d+(?:\.\d+)?")
HOURS = re.compile(r"(\d+\.\d+) h\b")


def table_rows(markdown: str) -> dict[str, str]:
    """Table rows by their first cell (the method); the first row of each method (ours, before the paper's)."""
    rows: dict[str, str] = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    return rows


def prose(markdown: str) -> str:
    return "\n".join(line for line in markdown.splitlines() if not line.startswith("|"))


def report_cells() -> set[str]:
    text = (SETTING / "benchmark.md").read_text() + (SETTING / "differences.md").read_text()
    return set(SPREAD.findall(text))


@pytest.mark.parametrize("write_up", WRITE_UPS[:2], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_quoted_table_is_the_reports_table(write_up):
    report = table_rows((SETTING / "benchmark.md").read_text().split("The paper's")[0])
    quoted = {method: row for method, row in table_rows(write_up.read_text()).items() if method in report}
    assert set(quoted) == set(report), f"{write_up.name} leaves out rows of benchmark.md"
    for method, row in quoted.items():
        assert row == report[method], f"{write_up.name}: the {method} row differs from benchmark.md"


@pytest.mark.parametrize("write_up", WRITE_UPS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_quoted_spread_and_total_is_the_reports(write_up):
    text = prose(write_up.read_text())
    quoted = set(SPREAD.findall(text))
    assert quoted, f"{write_up.name} quotes no number from the report"
    assert quoted <= report_cells(), (
        f"{write_up.name} quotes numbers no table of the report has: {quoted - report_cells()}"
    )
    index_hours = set(HOURS.findall((REPORT / "index.md").read_text()))
    for hours in HOURS.findall(text):
        assert hours in index_hours, f"{write_up.name} quotes {hours} h; the report's index.md sums {index_hours}"


def test_the_check_sees_a_drifted_number():
    drifted = prose((ROOT / "README.md").read_text()).replace("−1.1 ± 1.3", "−1.2 ± 1.3")
    assert not set(SPREAD.findall(drifted)) <= report_cells()


def test_the_method_pages_toy_numbers_are_the_illustrative_runs():
    """docs/method.md quotes the illustrative experiments' numbers: each is in the numbers file the same run wrote."""
    page = (ROOT / "docs" / "method.md").read_text()
    section = page[page.index("## What it does on toy data") : page.index("## Cost")]
    quoted = set(re.findall(r"\b\d\.\d{4}\b", section))
    written = set(re.findall(r"\b\d\.\d{4}\b", (ROOT / "docs" / "figures" / "illustrative_numbers.md").read_text()))
    assert len(quoted) >= 8 and quoted <= written, quoted - written


def test_each_speed_ratio_on_the_performance_page_is_in_a_benchmark_result():
    """A ratio quoted as "2.46x" on docs/performance.md is a number some file of benchmarks/results/ holds."""
    page = (ROOT / "docs" / "performance.md").read_text()
    results = "".join(p.read_text() for p in (ROOT / "benchmarks" / "results").glob("*.md"))
    measured = set(re.findall(r"\d+\.\d+", results))
    quoted = {q for q in re.findall(r"(\d+\.\d+)x\b", page) if q not in ("3.3",)}  # 3.3x: the paper's own figure
    assert len(quoted) >= 10 and quoted <= measured, quoted - measured
