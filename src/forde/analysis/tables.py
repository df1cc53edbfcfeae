"""The benchmark comparison (the paper's Tables 1, 2 and 4): mean ± std over seeds per method
variant, best in bold, as Markdown and LaTeX, optionally beside the paper's reported numbers; and each
variant's difference to DE paired by seed. Both count seeds, not runs (see forde.analysis.aggregate)."""

from __future__ import annotations

from dataclasses import dataclass, field

from forde.analysis import paper as paper_numbers
from forde.analysis.aggregate import Setting, Stat, by_variant, metric_stat, seed_count, seed_values, stat
from forde.analysis.results import Run
from forde.analysis.variants import sort_key, variant


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
        """The value at display precision; one that rounds to zero shows as zero, never "-0.000"."""
        text = f"{value * self.scale:.{self.digits}f}"
        return text.lstrip("-") if float(text) == 0 else text

    def signed(self, value: float) -> str:
        """A difference: "+0.012" or "−0.4" (a minus sign), unsigned when it rounds to zero."""
        text = self.fmt(abs(value))
        return text if float(text) == 0 else ("+" if value > 0 else "−") + text


CLEAN = (
    Column("NLL", "test/nll", False, 3),
    Column("Accuracy (%)", "test/accuracy", True, 1, 100.0),
    Column("ECE", "test/ece", False, 3),
)
CORRUPTED = (
    Column("cA (%)", "corrupted/accuracy", True, 1, 100.0),
    Column("cNLL", "corrupted/nll", False, 3),
    Column("cECE", "corrupted/ece", False, 3),
)


CALIBRATED = (
    Column("NLL", "test/nll", False, 3),
    Column("NLL, TS", "test/ts/nll", False, 3),
    Column("ECE", "test/ece", False, 3),
    Column("ECE, TS", "test/ts/ece", False, 3),
    Column("Brier", "test/brier", False, 3),
    Column("Brier, TS", "test/ts/brier", False, 3),
    Column("AURC", "test/aurc", False, 4),
    Column("AUGRC", "test/augrc", False, 4),
)
OOD_SCORE_NAMES = {
    "msp": "MSP",
    "mi": "mutual information",
    "entropy": "entropy",
    "energy": "energy",
    "max_logit": "max logit",
}


COST = (  # run.seconds' keys, as multiples of the baseline's time on the same seed
    Column("Training time (× DE)", "cost/train", False, 2),
    Column("Evaluation time (× DE)", "cost/eval", False, 2),
)


def ood_columns(runs: list[Run], score: str) -> tuple[Column, ...]:
    """AUROC and FPR95 of `score` for every OOD set the runs were scored on."""
    sets = sorted({k.split("/")[1] for r in runs for k in r.summary if k.startswith("ood/")})
    return tuple(
        column
        for name in sets
        for column in (
            Column(f"{name} AUROC (%)", f"ood/{name}/auroc_{score}", True, 1, 100.0),
            Column(f"{name} FPR95 (%)", f"ood/{name}/fpr95_{score}", False, 1, 100.0),
        )
    )


def metric_table(runs: list[Run], setting: Setting, columns: tuple[Column, ...], title: str) -> Table | None:
    """One row per variant of any metrics (mean ± std over seeds, best in bold); None when no run has them."""
    if not columns or not any(r.metric(c.key) is not None for r in runs for c in columns):
        return None
    rows = [
        Row(v, seed_count(rs), {c.key: metric_stat(rs, c.key) for c in columns}) for v, rs in by_variant(runs).items()
    ]
    return Table(setting, columns, rows, title=f"{setting.title}: {title}")


def time_ratios(runs: list[Run], baseline: list[Run], kind: str) -> dict[int, float]:
    """`runs`' recorded `kind` seconds ("train", "eval") over `baseline`'s on each seed both recorded."""
    mine, base = (seed_values(rs, lambda r: r.seconds.get(kind)) for rs in (runs, baseline))
    return {seed: mine[seed] / base[seed] for seed in mine if isinstance(seed, int) and base.get(seed)}


def cost_table(runs: list[Run], setting: Setting, baseline: str = "DE") -> Table | None:
    """Each variant's training and evaluation time as a multiple of `baseline`'s on the same seed, beside its
    accuracy and corrupted-data metrics: what each variant (FoRDE with the repulsion every k-th step or on part
    of the batch, say) buys for its time. None when no variant shares a timed seed with the baseline."""
    variants = by_variant(runs)
    base = variants.get(baseline, [])
    quality = tuple(c for c in (CLEAN[1], *CORRUPTED) if any(r.metric(c.key) is not None for r in runs))
    rows = []
    for name, mine in variants.items():
        cells = {c.key: stat(time_ratios(mine, base, c.key.removeprefix("cost/")).values()) for c in COST}
        if all(cell is None for cell in cells.values()):
            continue
        cells |= {c.key: metric_stat(mine, c.key) for c in quality}
        marks = {c.key: corrupted_marks(mine, c.key) for c in quality if c in CORRUPTED}
        rows.append(Row(name, seed_count(mine), cells, marks=marks))
    if len(rows) < 2:  # the baseline alone says nothing
        return None
    return Table(setting, COST + quality, rows, title=f"{setting.title}: cost and quality")


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


def footnotes(marks: str) -> str:
    """The footnotes of the marks that occur in `marks`, in a fixed order."""
    return "".join(f" {mark} {text}." for mark, text in FOOTNOTES.items() if mark in marks)


@dataclass
class Row:
    variant: str
    seeds: int = 0  # distinct seeds; a cell may have fewer (a run without corrupted results)
    cells: dict[str, Stat | None] = field(default_factory=dict)
    paper: dict[str, str] = field(default_factory=dict)  # the paper's printed values, when asked for
    marks: dict[str, str] = field(default_factory=dict)  # column key -> FOOTNOTES marks


@dataclass
class Table:
    setting: Setting
    columns: tuple[Column, ...]
    rows: list[Row]
    paper_source: str | None = None  # e.g. "Table 2" when paper numbers are shown
    title: str | None = None  # the setting's title when None

    def best(self, column: Column) -> str | None:
        """The best mean as displayed (ties at display precision all count as best)."""
        shown = [column.fmt(cell.mean) for r in self.rows if (cell := r.cells.get(column.key))]
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
    rows = [
        Row(
            v,
            seed_count(rs),
            {c.key: metric_stat(rs, c.key) for c in columns},
            marks={c.key: corrupted_marks(rs, c.key) for c in columns if c in CORRUPTED},
        )
        for v, rs in by_variant(runs).items()
    ]
    source = None
    if paper:
        key = (setting.dataset, setting.model)
        source = paper_numbers.SOURCES.get(key)
        for name, values in paper_numbers.reported(*key).items():
            label = _our_label(name, key)
            row = next((r for r in rows if r.variant == label), None)
            if row is None:  # a variant only the paper has (e.g. Feature-RDE)
                row = Row(label)
                rows.append(row)
            row.paper = values
        rows.sort(key=lambda r: sort_key(r.variant))
    return Table(setting, columns, rows, source)


def _our_label(paper_name: str, key: tuple[str, str]) -> str:
    """Our variant that a paper row stands beside: FoRDE-Tuned only at the paper's own alpha for that dataset."""
    alpha = paper_numbers.TUNED_ALPHA.get(key)
    return variant("forde", alpha) if paper_name == "FoRDE-Tuned" and alpha is not None else paper_name


def _cell(table: Table, row: Row, column: Column, pm: str, bold: str) -> str:
    s = row.cells.get(column.key)
    if s is None:
        return "—"
    mean = column.fmt(s.mean)
    text = f"{mean} {pm} {column.fmt(s.std)}" if s.n > 1 else mean  # one seed has no spread to show
    fewer = f" (n={s.n})" if s.n < row.seeds else ""  # some seeds lack this metric
    return (bold.format(text) if mean == table.best(column) else text) + fewer + row.marks.get(column.key, "")


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
    """Our numbers, then the paper's (when asked for) as a table of their own: each fits a page's width."""
    lines = [f"### {table.title or table.setting.title}", ""]
    ours = [r for r in table.rows if r.seeds] if table.paper_source else table.rows
    head = ["Method", "Seeds", *(f"{c.label} {c.arrow}" for c in table.columns)]
    cells = [
        [r.variant, str(r.seeds or "—"), *(_cell(table, r, c, "±", "**{}**") for c in table.columns)] for r in ours
    ]
    lines += _markdown_table(head, cells)
    if table.paper_source:
        theirs = [r for r in table.rows if r.paper]
        lines += ["", f"The paper's {table.paper_source} (Trinh et al., 2024):", ""]
        lines += _markdown_table(
            ["Method", *(f"{c.label} {c.arrow}" for c in table.columns)],
            [[r.variant, *(r.paper.get(c.key, "—") for c in table.columns)] for r in theirs],
        )
    lines += ["", _note(table)]
    return "\n".join(lines) + "\n"


def _markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def to_latex(table: Table) -> str:
    head = [_tex(h) for h in _header(table, {"↑": r"$\uparrow$", "↓": r"$\downarrow$"}, "(paper)")]
    rows = [[_tex(c) for c in _cells(table, r, r"$\pm$", r"\textbf{{{}}}")] for r in table.rows]
    tabular = [
        r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
        r"\toprule",
        " & ".join(head) + r" \\",
        r"\midrule",
        *(" & ".join(r) + r" \\" for r in rows),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    env = "table"
    if table.paper_source:  # twice the columns: the full text width, scaled to fit
        env = "table*"
        tabular[0] = r"\resizebox{\textwidth}{!}{" + tabular[0]
        tabular[-1] += "}"
    lines = [
        rf"\begin{{{env}}}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{_tex(table.title or table.setting.title)}. {_tex(_note(table))}}}",
        *tabular,
        rf"\end{{{env}}}",
    ]
    return "\n".join(lines) + "\n"


SEEDS_NOTE = (
    "Seeds: distinct seeds; runs repeated at one seed count once, as their mean. Mean ± sample standard "
    "deviation over seeds (n − 1 denominator; the value alone for one seed); (n=k): a cell from only k of the "
    "row's seeds."
)


def _note(table: Table) -> str:
    note = SEEDS_NOTE + " Best mean in bold."
    if any(c.key.startswith("ood/") for c in table.columns):
        note += (
            " OOD detection with the in-distribution test set as positives: AUROC, and FPR95, the share of OOD "
            "inputs kept at the threshold that keeps 95% of the test set."
        )
    if any(c in COST for c in table.columns):
        note += (
            " Training / evaluation time: what the run measured (its epochs; its final evaluation: test, validation"
            " and corrupted sets) divided by DE's on the same seed, so each ratio pairs runs of one seed; runs that"
            " shared a machine carry its load, and benchmarks/ times single steps without it."
        )
    if any("/ts/" in c.key for c in table.columns):
        note += (
            " TS: after temperature scaling fitted on the validation split, never on test (one temperature for the"
            " ensemble, or one per member where eval.calibrate_members was set)."
        )
    if any(c in table.columns for c in CORRUPTED):
        note += (
            " cA / cNLL / cECE: accuracy, NLL and ECE of each severity's corruption types pooled into one"
            " set, averaged over the severities (as the paper's release computes them)."
        )
    note += footnotes("".join(m for r in table.rows for m in r.marks.values()))
    if table.paper_source:
        key = (table.setting.dataset, table.setting.model)
        here = f"{table.setting.network}, M = {table.setting.ensemble_size}"
        note += (
            f" The paper's numbers: those Trinh et al. (2024) report in {table.paper_source} "
            f"({paper_numbers.PROTOCOL[key]}; here: {here})."
        )
        alpha = paper_numbers.TUNED_ALPHA.get(key)
        if alpha is not None and "FoRDE-Tuned" in paper_numbers.reported(*key):
            note += (
                f" The paper's FoRDE-Tuned is its α = {alpha:g} (appendix D.4), so it stands beside our runs at"
                " that α only."
            )
    return note


def paired_differences(runs: list[Run], baseline: list[Run], key: str) -> dict[int, float]:
    """`runs` minus `baseline` on each seed both have `key` for, one value per seed on each side (runs of unknown
    seed pair with none)."""
    mine, base = (seed_values(rs, lambda r: r.metric(key)) for rs in (runs, baseline))
    return {seed: mine[seed] - base[seed] for seed in mine if isinstance(seed, int) and seed in base}


def difference_table(runs: list[Run], setting: Setting, baseline: str = "DE") -> str | None:
    """Each variant minus `baseline` on the seeds both ran, as Markdown: whether a difference between methods
    outruns the noise between seeds, which the benchmark table's separate standard deviations cannot say.
    None when no variant shares a seed with the baseline."""
    variants = by_variant(runs)
    base = variants.get(baseline, [])
    columns = CLEAN + (CORRUPTED if any(r.has_corrupted for r in runs) else ())
    rows, used = [], ""
    for name, mine in variants.items():
        seeds = {r.seed for r in mine} & {r.seed for r in base} - {None} if name != baseline else set()
        if not seeds:
            continue
        paired = [r for r in mine + base if r.seed in seeds]
        cells = []
        for c in columns:
            marks = corrupted_marks(paired, c.key) if c in CORRUPTED else ""
            cells.append(_difference(c, paired_differences(mine, base, c.key)) + marks)
            used += marks
        rows.append([name, str(len(seeds)), *cells])
    if not rows:
        return None
    head = ["Method", "Seeds", *(f"Δ {c.label} {c.arrow}" for c in columns)]
    note = (
        f"Each variant's value minus {baseline}'s on the same seed: mean ± sample standard deviation over the "
        f"seeds both ran (Seeds; runs repeated at one seed count once, as their mean); (k/n): on k of the n "
        f"seeds that have this metric on both sides the variant did better than {baseline}. A mean within about "
        "its standard deviation of zero is inside seed noise; one that rounds to zero shows without a sign."
    )
    note += footnotes(used)
    if SET_MEAN_ECE in used:
        note += f" A Δ cECE marked {SET_MEAN_ECE} may set a per-set mean against a pooled cECE, which biases it."
    lines = [
        f"### {setting.title}: difference to {baseline}, paired by seed",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        note,
    ]
    return "\n".join(lines) + "\n"


def _difference(column: Column, diffs: dict[int, float]) -> str:
    """mean ± std of the per-seed differences, and on how many seeds the variant did better."""
    s = stat(diffs.values())
    if s is None:  # no seed in common (or no difference that is a number)
        return "—"
    better = sum((d > 0) == column.higher_is_better and d != 0 for d in diffs.values())
    spread = f" ± {column.fmt(s.std)}" if s.n > 1 else ""
    return f"{column.signed(s.mean)}{spread} ({better}/{s.n})"


def _tex(text: str) -> str:
    for plain, tex in (
        ("%", r"\%"),
        ("α", r"$\alpha$"),
        ("±", r"$\pm$"),
        ("—", "--"),
        ("_", r"\_"),
        ("†", r"\dag{}"),
        ("‡", r"\ddag{}"),
        ("*", r"$^*$"),
        ("−", "$-$"),
    ):
        text = text.replace(plain, tex)
    return text
