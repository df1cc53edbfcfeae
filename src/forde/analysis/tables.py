"""The benchmark comparison (the paper's Tables 1, 2 and 4): mean ± std over seeds per method
variant, best in bold, as Markdown and LaTeX, optionally beside the paper's reported numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

from forde.analysis import paper as paper_numbers
from forde.analysis.aggregate import Setting, Stat, by_variant, metric_stat, stat
from forde.analysis.results import Run
from forde.analysis.variants import sort_key, tuned_alpha


@dataclass(frozen=True)
class Column:
    label: str
    key: str  # summary key
    higher_is_better: bool
    digits: int
    scale: float = 1.0  # fractions -> percent for accuracies

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def fmt(self, value: float) -> str:
        return f"{value * self.scale:.{self.digits}f}"


CLEAN = (Column("NLL", "test/nll", False, 3), Column("Accuracy (%)", "test/accuracy", True, 1, 100.0),
         Column("ECE", "test/ece", False, 3))
CORRUPTED = (Column("cA (%)", "corrupted/accuracy", True, 1, 100.0), Column("cNLL", "corrupted/nll", False, 3),
             Column("cECE", "corrupted/ece", False, 3))


# Marks on corrupted-data cells, explained under the table
REGENERATED, UNRECORDED, SET_MEAN_ECE = "†", "*", "‡"
FOOTNOTES = {
    REGENERATED: "computed on corrupted sets generated here (the published recipe, not the released files)",
    UNRECORDED: "from results that do not record whether their corrupted sets were generated here",
    SET_MEAN_ECE: "cECE of results written before cECE pooled each severity's sets: the mean of the per-set "
                  "ECEs, which reads higher than the pooled cECE",
}


def corrupted_marks(runs: list[Run], key: str) -> str:
    """The marks a corrupted-data number computed from `runs` carries (see FOOTNOTES)."""
    runs = [r for r in runs if r.has_corrupted]
    marks = REGENERATED if any(r.regenerated for r in runs) else ""
    marks += UNRECORDED if any(r.regenerated is None for r in runs) else ""
    return marks + (SET_MEAN_ECE if key == "corrupted/ece" and any(r.set_mean_cece for r in runs) else "")


@dataclass
class Row:
    variant: str
    seeds: int = 0
    cells: dict[str, Stat | None] = field(default_factory=dict)
    paper: dict[str, str] = field(default_factory=dict)  # the paper's printed values, when asked for
    marks: dict[str, str] = field(default_factory=dict)  # column key -> FOOTNOTES marks


@dataclass
class Table:
    setting: Setting
    columns: tuple[Column, ...]
    rows: list[Row]
    paper_source: str | None = None  # e.g. "Table 2" when paper numbers are shown

    def best(self, column: Column) -> str | None:
        """The best mean as displayed (ties at display precision all count as best)."""
        shown = [column.fmt(r.cells[column.key].mean) for r in self.rows if r.cells.get(column.key)]
        if not shown:
            return None
        pick = max if column.higher_is_better else min
        return pick(shown, key=float)

    def value(self, variant: str, key: str) -> Stat | None:
        return next((r.cells.get(key) for r in self.rows if r.variant == variant), None)


def benchmark_table(runs: list[Run], setting: Setting, paper: bool = False) -> Table:
    """One row per variant present (plus paper-only variants when `paper`), corrupted columns only when
    some run has corrupted results."""
    columns = CLEAN + (CORRUPTED if any(r.metric("corrupted/accuracy") is not None for r in runs) else ())
    rows = [Row(v, len(rs), {c.key: metric_stat(rs, c.key) for c in columns},
                marks={c.key: corrupted_marks(rs, c.key) for c in columns if c in CORRUPTED})
            for v, rs in by_variant(runs).items()]
    source = None
    if paper:
        reported = paper_numbers.reported(setting.dataset, setting.model)
        source = paper_numbers.SOURCES.get((setting.dataset, setting.model))
        for name, values in reported.items():
            matches = [r for r in rows if _paper_name(r.variant) == name]
            if not matches:  # a variant only the paper has (e.g. Feature-RDE)
                matches = [Row(name)]
                rows.extend(matches)
            for r in matches:
                r.paper = values
        rows.sort(key=lambda r: sort_key(r.variant))
    return Table(setting, columns, rows, source)


def _paper_name(variant: str) -> str:
    return "FoRDE-Tuned" if tuned_alpha(variant) is not None else variant


def _cell(table: Table, row: Row, column: Column, pm: str, bold: str) -> str:
    s = row.cells.get(column.key)
    if s is None:
        return "—"
    mean = column.fmt(s.mean)
    text = f"{mean} {pm} {column.fmt(s.std)}" if s.n > 1 else mean  # one seed has no spread to show
    return (bold.format(text) if mean == table.best(column) else text) + row.marks.get(column.key, "")


def _header(table: Table, arrows: dict[str, str], paper_label: str) -> list[str]:
    cols = []
    for c in table.columns:
        cols.append(f"{c.label} {arrows[c.arrow]}")
        if table.paper_source:
            cols.append(f"{c.label} {paper_label}")
    return ["Method", "Seeds", *cols]


def _cells(table: Table, row: Row, pm: str, bold: str) -> list[str]:
    out = []
    for c in table.columns:
        out.append(_cell(table, row, c, pm, bold))
        if table.paper_source:
            out.append(row.paper.get(c.key, "—"))
    return [row.variant, str(row.seeds or "—"), *out]


def to_markdown(table: Table) -> str:
    head = _header(table, {"↑": "↑", "↓": "↓"}, "(paper)")
    lines = [f"### {table.setting.title}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join([":---", "---:"] + ["---:"] * (len(head) - 2)) + "|"]
    lines += ["| " + " | ".join(_cells(table, r, "±", "**{}**")) + " |" for r in table.rows]
    lines += ["", _note(table)]
    return "\n".join(lines) + "\n"


def to_latex(table: Table) -> str:
    head = [_tex(h) for h in _header(table, {"↑": r"$\uparrow$", "↓": r"$\downarrow$"}, "(paper)")]
    rows = [[_tex(c) for c in _cells(table, r, r"$\pm$", r"\textbf{{{}}}")] for r in table.rows]
    tabular = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\", r"\midrule",
               *(" & ".join(r) + r" \\" for r in rows), r"\bottomrule", r"\end{tabular}"]
    env = "table"
    if table.paper_source:  # twice the columns: the full text width, scaled to fit
        env = "table*"
        tabular[0] = r"\resizebox{\textwidth}{!}{" + tabular[0]
        tabular[-1] += "}"
    lines = [rf"\begin{{{env}}}[t]", r"\centering", r"\small",
             rf"\caption{{{_tex(table.setting.title)}. {_tex(_note(table))}}}", *tabular, rf"\end{{{env}}}"]
    return "\n".join(lines) + "\n"


def _note(table: Table) -> str:
    note = "Mean ± standard deviation over seeds (the value alone for one seed); best mean in bold."
    if any(c in table.columns for c in CORRUPTED):
        note += (" cA / cNLL / cECE: accuracy, NLL and ECE of each severity's corruption types pooled into one"
                 " set, averaged over the severities (as the paper's release computes them).")
    used = "".join(m for r in table.rows for m in r.marks.values())
    note += "".join(f" {mark} {text}." for mark, text in FOOTNOTES.items() if mark in used)
    if table.paper_source:
        note += f" (paper): the numbers reported by Trinh et al. (2024), {table.paper_source}"
        note += f", for the paper's full-size network ({table.setting.arch} here)." if table.setting.arch else "."
    return note


def difference_table(runs: list[Run], setting: Setting, baseline: str = "DE") -> str | None:
    """Each variant minus `baseline` on the seeds both ran, as Markdown: whether a difference between methods
    outruns the noise between seeds, which the benchmark table's separate standard deviations cannot say.
    None when no variant shares a seed with the baseline."""
    variants = by_variant(runs)
    base = _by_seed(variants.get(baseline, []))
    columns = CLEAN + (CORRUPTED if any(r.has_corrupted for r in runs) else ())
    rows = []
    for name, runs_here in variants.items():
        mine = _by_seed(runs_here)
        seeds = sorted(set(mine) & set(base)) if name != baseline else []
        if seeds:
            rows.append([name, str(len(seeds)), *(_difference(c, [(mine[s], base[s]) for s in seeds]) for c in columns)])
    if not rows:
        return None
    head = ["Method", "Seeds", *(f"Δ {c.label} {c.arrow}" for c in columns)]
    lines = [f"### {setting.title}: difference to {baseline}, paired by seed", "",
             "| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|",
             *("| " + " | ".join(r) + " |" for r in rows), "",
             f"Each variant's value minus {baseline}'s on the same seed: mean ± standard deviation over the seeds both "
             f"ran; (k/n): on k of the n seeds the variant did better than {baseline}. A mean within about its "
             "standard deviation of zero is inside seed noise."]
    return "\n".join(lines) + "\n"


def _by_seed(runs: list[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for r in runs:
        out.setdefault(r.seed, []).append(r)
    return out


def _difference(column: Column, pairs: list[tuple[list[Run], list[Run]]]) -> str:
    """mean ± std of (variant - baseline) over paired seeds, each side averaged over its runs of that seed."""
    diffs = [mine.mean - base.mean for mine, base in
             ((metric_stat(m, column.key), metric_stat(b, column.key)) for m, b in pairs) if mine and base]
    if not diffs:
        return "—"
    s = stat(diffs)
    better = sum((d > 0) == column.higher_is_better and d != 0 for d in diffs)
    sign = "+" if s.mean >= 0 else "−"
    spread = f" ± {column.fmt(s.std)}" if s.n > 1 else ""
    return f"{sign}{column.fmt(abs(s.mean))}{spread} ({better}/{len(diffs)})"


def _tex(text: str) -> str:
    for plain, tex in (("%", r"\%"), ("α", r"$\alpha$"), ("±", r"$\pm$"), ("—", "--"), ("_", r"\_"),
                       ("†", r"\dag{}"), ("‡", r"\ddag{}"), ("*", r"$^*$")):
        text = text.replace(plain, tex)
    return text
