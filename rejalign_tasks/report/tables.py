"""The spec's tables filled from the models' runs, every value checked against its samples, and
written as Markdown (``report.md``) and CSV (``table_<section>.csv``, ``cells.csv``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from rejalign_tasks.report.errors import ReportInputError
from rejalign_tasks.report.logs import ModelRuns, TaskRun
from rejalign_tasks.report.spec import Column, Section

MISSING = "missing"
NOT_AVAILABLE = "n/a"


@dataclass
class Cell:
    value: float  # the raw metric (NaN when no sample carried it)
    n: int
    stderr: float | None
    run: TaskRun | None  # None: the model was not evaluated on the column's task

    @property
    def status(self) -> str:
        if self.run is None:
            return MISSING
        return "ok" if math.isfinite(self.value) else NOT_AVAILABLE


@dataclass
class ResolvedColumn:
    column: Column
    task: str


@dataclass
class Table:
    section: Section
    columns: list[ResolvedColumn]
    rows: list[ModelRuns]
    cells: dict[tuple[str, int], Cell] = field(default_factory=dict)

    def cell(self, row: ModelRuns, j: int) -> Cell:
        return self.cells[(row.label, j)]


def resolve_columns(section: Section, models: Sequence[ModelRuns]) -> list[ResolvedColumn]:
    """The section's columns that some model was evaluated on, each bound to one task.

    A column takes the first of its tasks that every model has, else the first that any has;
    models lacking it are then missing that cell.
    """
    out = []
    for column in section.columns:
        present = [t for t in column.tasks if any(t in m.tasks for m in models)]
        if not present:
            continue
        everywhere = [t for t in column.tasks if all(t in m.tasks for m in models)]
        out.append(ResolvedColumn(column, (everywhere or present)[0]))
    return out


def build_tables(
    models: Sequence[ModelRuns],
    spec: Sequence[Section],
    sections: Sequence[str] | None = None,
    allow_missing: bool = False,
) -> list[Table]:
    """Fill the spec's tables from the models' runs, each value checked against its samples."""
    if sections:
        unknown = [s for s in sections if s not in {x.key for x in spec}]
        if unknown:
            raise ReportInputError(
                f"unknown section(s) {', '.join(unknown)}; the spec has "
                f"{', '.join(s.key for s in spec)}"
            )
        spec = [s for s in spec if s.key in sections]
    tables, gaps = [], []
    for section in spec:
        columns = resolve_columns(section, models)
        if not columns:
            continue
        table = Table(section, columns, list(models))
        for row in models:
            for j, rc in enumerate(columns):
                run = row.tasks.get(rc.task)
                if run is None:
                    others = [t for t in rc.column.tasks if t in row.tasks]
                    hint = (
                        f" (it has {others[0]}; evaluate all models on the same task)"
                        if others
                        else ""
                    )
                    gaps.append(
                        f"{row.label}: no run of {rc.task} for column {rc.column.header!r} "
                        f"of table {section.key!r}{hint}"
                    )
                    table.cells[(row.label, j)] = Cell(math.nan, 0, None, None)
                    continue
                value, n = run.checked_value(rc.column.metric, rc.column.filter)
                stderr = run.stderr(rc.column.metric, rc.column.filter)
                table.cells[(row.label, j)] = Cell(value, n, stderr, run)
        tables.append(table)
    if not tables:
        tasks = sorted({t for m in models for t in m.tasks})
        raise ReportInputError(
            f"none of the spec's tasks was found in the inputs (tasks found: {', '.join(tasks)})"
        )
    if gaps and not allow_missing:
        raise ReportInputError(
            "incomplete inputs, the table would have gaps:\n  "
            + "\n  ".join(dict.fromkeys(gaps))
            + "\n(run the missing tasks, leave those models out, or pass --allow-missing to "
            "show the cells as 'missing')"
        )
    return tables


def _fmt(cell: Cell, column: Column) -> str:
    if cell.status != "ok":
        return cell.status
    return f"{cell.value * column.scale:.{column.digits}f}"


def refusal_fraction_text(row: ModelRuns) -> str:
    if row.adapter is None:
        return "base"
    f = row.refusal_fraction
    return f"{f:.3g}" if f is not None else "unknown"


def md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown_table(table: Table) -> str:
    """A GitHub Markdown table; the best finite value of each column is bold."""
    show_fraction = any(r.adapter is not None for r in table.rows)
    header = ["Model"] + (["Refusal fraction"] if show_fraction else [])
    header += [rc.column.header for rc in table.columns]
    lines = ["| " + " | ".join(map(md_escape, header)) + " |"]
    lines.append("|" + "---|" + ("---:|" if show_fraction else "") + "---:|" * len(table.columns))
    best: dict[int, float] = {}
    for j, rc in enumerate(table.columns):
        values = [table.cell(r, j).value for r in table.rows if table.cell(r, j).status == "ok"]
        if len(values) > 1:
            best[j] = max(values) if rc.column.higher_is_better else min(values)
    for row in table.rows:
        label = md_escape(row.label) + (" †" if row_limited(table, row) else "")
        cells = [label] + ([refusal_fraction_text(row)] if show_fraction else [])
        for j, rc in enumerate(table.columns):
            cell = table.cell(row, j)
            text = _fmt(cell, rc.column)
            if cell.status == "ok" and j in best and cell.value == best[j]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def row_limited(table: Table, row: ModelRuns) -> bool:
    return any(
        table.cell(row, j).run is not None and table.cell(row, j).run.limited
        for j in range(len(table.columns))
    )


def table_csv(table: Table) -> str:
    """Wide CSV: one row per model, the shown values unrounded; gaps written as words."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["model", "backend", "pretrained", "adapter", "refusal_fraction", "limited"]
        + [rc.column.header for rc in table.columns]
    )
    for row in table.rows:
        f = row.refusal_fraction
        values = []
        for j, rc in enumerate(table.columns):
            cell = table.cell(row, j)
            ok = cell.status == "ok"
            values.append(repr(cell.value * rc.column.scale) if ok else cell.status)
        w.writerow(
            [
                row.label,
                row.backend,
                row.pretrained,
                row.adapter or "",
                "" if f is None else repr(f),
                str(row_limited(table, row)).lower(),
            ]
            + values
        )
    return buf.getvalue()


def cells_csv(tables: Sequence[Table]) -> str:
    """Long CSV: every cell with its raw value, sample count and provenance."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "section",
            "model",
            "column",
            "task",
            "metric",
            "filter",
            "status",
            "value",
            "n",
            "stderr",
            "n_prompts",
            "n_prompts_in_task",
            "results_file",
            "samples_file",
        ]
    )
    for t in tables:
        for row in t.rows:
            for j, rc in enumerate(t.columns):
                c = t.cell(row, j)
                run = c.run
                w.writerow(
                    [
                        t.section.key,
                        row.label,
                        rc.column.header,
                        rc.task,
                        rc.column.metric,
                        rc.column.filter,
                        c.status,
                        "" if c.status != "ok" else repr(c.value),
                        c.n,
                        "" if c.stderr is None else repr(c.stderr),
                        "" if run is None else run.n_effective,
                        "" if run is None else run.n_original,
                        "" if run is None else str(run.results_file),
                        "" if run is None else str(run.samples_file),
                    ]
                )
    return buf.getvalue()
