"""``rejalign-report``: from lm-eval output folders to the paper's table, plots and paired tests.

``rejalign-report table RUNS... -o DIR`` writes ``report.md`` (every table, its sources and notes),
``table_<section>.csv`` (one per table, shown values unrounded), ``cells.csv`` (one row per cell
with its raw value, sample count, task, metric and files), the figures
``asr_vs_refusal_fraction.{png,svg}`` and ``safety_tradeoffs.{png,svg}``, and, with
``--baseline LABEL``, ``comparisons.csv``: every other model against the baseline on each
headline column, paired on the same prompts.

``rejalign-report compare A B --task T --metric asr`` compares two runs on the same prompts: the
change in rate with a bootstrap interval and the exact McNemar p-value.

Every shown number is checked against the per-sample logs; missing or partial inputs are errors
that say what is missing (``--allow-missing`` shows a missing cell as ``missing``, footnoted).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rejalign_tasks.contracts import write_text_atomic
from rejalign_tasks.report.logs import (
    PROVENANCE_DOC_FIELDS,
    ModelRuns,
    PairedLabels,
    ReportInputError,
    TaskRun,
    load_models,
    paired_labels,
    parse_input,
)
from rejalign_tasks.report.spec import Column, Section, SpecError, default_spec, load_spec
from rejalign_tasks.report.stats import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    PairedComparison,
    paired_comparison,
)

MISSING = "missing"
NOT_AVAILABLE = "n/a"
PLOT_STEMS = ("asr_vs_refusal_fraction", "safety_tradeoffs")


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


def _fraction(row: ModelRuns) -> str:
    if row.adapter is None:
        return "base"
    f = row.refusal_fraction
    return f"{f:.3g}" if f is not None else "unknown"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown_table(table: Table) -> str:
    """A GitHub Markdown table; the best finite value of each column is bold."""
    show_fraction = any(r.adapter is not None for r in table.rows)
    header = ["Model"] + (["Refusal fraction"] if show_fraction else [])
    header += [rc.column.header for rc in table.columns]
    lines = ["| " + " | ".join(map(_md_escape, header)) + " |"]
    lines.append("|" + "---|" + ("---:|" if show_fraction else "") + "---:|" * len(table.columns))
    best: dict[int, float] = {}
    for j, rc in enumerate(table.columns):
        values = [table.cell(r, j).value for r in table.rows if table.cell(r, j).status == "ok"]
        if len(values) > 1:
            best[j] = max(values) if rc.column.higher_is_better else min(values)
    for row in table.rows:
        label = _md_escape(row.label) + (" †" if _row_limited(table, row) else "")
        cells = [label] + ([_fraction(row)] if show_fraction else [])
        for j, rc in enumerate(table.columns):
            cell = table.cell(row, j)
            text = _fmt(cell, rc.column)
            if cell.status == "ok" and j in best and cell.value == best[j]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row_limited(table: Table, row: ModelRuns) -> bool:
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
                str(_row_limited(table, row)).lower(),
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


# -- paired comparisons --------------------------------------------------------------------------


@dataclass
class ComparisonRow:
    baseline: str
    model: str
    column: str
    task: str
    metric: str
    result: PairedComparison
    pairs: PairedLabels


def compare_runs(
    run_a: TaskRun,
    run_b: TaskRun,
    metric: str,
    filter_name: str = "none",
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    ignore_doc_fields: Sequence[str] = tuple(PROVENANCE_DOC_FIELDS),
) -> tuple[PairedComparison, PairedLabels]:
    """Pair two runs' per-sample labels (checked against their results) and compare them."""
    for run in (run_a, run_b):
        run.checked_value(metric, filter_name)
    pairs = paired_labels(run_a, run_b, metric, filter_name, ignore_doc_fields)
    result = paired_comparison(
        pairs.a, pairs.b, resamples=resamples, seed=seed, confidence=confidence
    )
    return result, pairs


def baseline_comparisons(
    tables: Sequence[Table], baseline: str, *, resamples: int, seed: int
) -> tuple[list[ComparisonRow], list[str]]:
    """Every model against the baseline on every headline (role) column.

    Also returns a note for each pair that could not be compared (a missing cell).
    """
    labels = {r.label for t in tables for r in t.rows}
    if baseline not in labels:
        raise ReportInputError(
            f"--baseline {baseline!r} is not one of the models: {', '.join(sorted(labels))}"
        )
    out: list[ComparisonRow] = []
    skipped: list[str] = []
    seen: set[tuple[str, str]] = set()
    for t in tables:
        for j, rc in enumerate(t.columns):
            if not rc.column.role or (rc.task, rc.column.metric) in seen:
                continue
            seen.add((rc.task, rc.column.metric))
            base_row = next(r for r in t.rows if r.label == baseline)
            base = t.cell(base_row, j).run
            for row in t.rows:
                other = t.cell(row, j).run
                if row.label == baseline:
                    continue
                if base is None or other is None:
                    who = baseline if base is None else row.label
                    skipped.append(f"{row.label}, {rc.column.header}: not compared ({who} missing)")
                    continue
                result, pairs = compare_runs(
                    base,
                    other,
                    rc.column.metric,
                    rc.column.filter,
                    resamples=resamples,
                    seed=seed,
                )
                out.append(
                    ComparisonRow(
                        baseline,
                        row.label,
                        rc.column.header,
                        rc.task,
                        rc.column.metric,
                        result,
                        pairs,
                    )
                )
    return out, skipped


def _pair_notes(pairs: PairedLabels) -> list[str]:
    """What differed between two runs on the same documents (never enough to be an error)."""
    notes = []
    n = len(pairs.doc_ids)
    if pairs.prompt_text_differs:
        notes.append(
            f"the rendered text prompt differs on {pairs.prompt_text_differs} of {n} pairs "
            "(e.g. different chat templates or system prompts)"
        )
    if pairs.images_differ:
        notes.append(
            f"the logged image hashes differ on {pairs.images_differ} of {n} pairs (the same "
            "documents rendered by other font-rasteriser or PNG-encoder versions, or another "
            "image source)"
        )
    return notes


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def comparisons_markdown(rows: Sequence[ComparisonRow]) -> str:
    lines = [
        "| Model | Column | Baseline (%) | Model (%) | Change (pp) | 95% CI (pp) | Discordant "
        "(base only / model only) | McNemar exact p | Prompts |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.result
        disc = f"{c.only_a} / {c.only_b}" if c.only_a is not None else "n/a (labels not 0/1)"
        p = f"{c.p_value:.3g}" if c.p_value is not None else "n/a"
        lines.append(
            f"| {_md_escape(r.model)} | {_md_escape(r.column)} | {100 * c.rate_a:.1f} | "
            f"{100 * c.rate_b:.1f} | {_pct(c.delta)} | [{_pct(c.ci_low)}, {_pct(c.ci_high)}] | "
            f"{disc} | {p} | {c.n} |"
        )
    return "\n".join(lines)


def comparisons_csv(rows: Sequence[ComparisonRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "baseline",
            "model",
            "column",
            "task",
            "metric",
            "n",
            "rate_baseline",
            "rate_model",
            "delta",
            "ci_low",
            "ci_high",
            "confidence",
            "only_baseline",
            "only_model",
            "mcnemar_p",
            "resamples",
            "seed",
            "prompt_text_differs",
            "images_differ",
        ]
    )
    for r in rows:
        c = r.result
        w.writerow(
            [
                r.baseline,
                r.model,
                r.column,
                r.task,
                r.metric,
                c.n,
                repr(c.rate_a),
                repr(c.rate_b),
                repr(c.delta),
                repr(c.ci_low),
                repr(c.ci_high),
                c.confidence,
                _blank(c.only_a),
                _blank(c.only_b),
                _blank(c.p_value),
                c.resamples,
                c.seed,
                r.pairs.prompt_text_differs,
                r.pairs.images_differ,
            ]
        )
    return buf.getvalue()


def _blank(v) -> str:
    return "" if v is None else repr(v)


# -- plots ---------------------------------------------------------------------------------------


def make_plots(tables: Sequence[Table], out_dir: Path) -> tuple[list[Path], list[str]]:
    """Draw the figures the data allow; return the files and a note for each figure not drawn."""
    from rejalign_tasks.report.plots import Panel, Point, asr_vs_refusal_fraction, safety_tradeoffs

    role_cols: dict[str, list[tuple[Table, int]]] = {
        "safety": [],
        "utility": [],
        "over_refusal": [],
    }
    seen = set()
    for t in tables:
        for j, rc in enumerate(t.columns):
            key = (rc.task, rc.column.metric)
            if rc.column.role and key not in seen:
                seen.add(key)
                role_cols[rc.column.role].append((t, j))

    files: list[Path] = []
    notes: list[str] = []

    def points(t: Table, j: int, x_of, figure: str) -> list[Point]:
        col = t.columns[j].column
        pts, left_out = [], []
        for row in t.rows:
            cell = t.cell(row, j)
            if cell.status == "ok":
                pts.append(Point(row.label, x_of(row), cell.value * col.scale))
            else:
                left_out.append(f"{row.label} ({cell.status})")
        if left_out:
            notes.append(f"{figure}, {col.header}: no point for {', '.join(left_out)}.")
        return pts

    rows = tables[0].rows
    if not role_cols["safety"]:
        notes.append("No figure: no safety (ASR) column in the report.")
        return files, notes
    if any(r.refusal_fraction is not None for r in rows):
        series = {
            t.columns[j].column.header: points(
                t, j, lambda r: r.refusal_fraction, "ASR against refusal fraction"
            )
            for t, j in role_cols["safety"]
        }
        files += asr_vs_refusal_fraction(series, out_dir / PLOT_STEMS[0])
        unknown = [r.label for r in rows if r.adapter is not None and r.refusal_fraction is None]
        if unknown:
            notes.append(
                "ASR against refusal fraction: drawn as horizontal references, no refusal "
                f"fraction known for adapter(s) {', '.join(unknown)} (no manifest)."
            )
    else:
        notes.append(
            "No ASR-against-refusal-fraction figure: no model has a known refusal fraction "
            "(adapters with a rejalign_manifest.json)."
        )
    t0, j0 = role_cols["safety"][0]
    y_name = t0.columns[j0].column.header
    y_by_label = {p.label: p.y for p in points(t0, j0, lambda r: 0.0, "Safety trade-offs")}
    panels = []
    for t, j in role_cols["over_refusal"] + role_cols["utility"]:
        col = t.columns[j].column
        pts = [
            Point(p.label, p.y, y_by_label[p.label])
            for p in points(t, j, lambda r: 0.0, "Safety trade-offs")
            if p.label in y_by_label
        ]
        panels.append(Panel(col.header, col.higher_is_better, pts))
    if panels:
        files += safety_tradeoffs(y_name, panels, out_dir / PLOT_STEMS[1])
    else:
        notes.append("No safety trade-off figure: no utility or over-refusal column in the report.")
    return files, notes


# -- the report as a whole -----------------------------------------------------------------------


def render_report(
    tables: Sequence[Table],
    comparisons: Sequence[ComparisonRow],
    plot_files: Sequence[Path],
    plot_notes: Sequence[str],
    comparison_notes: Sequence[str] = (),
    baseline: str | None = None,
) -> str:
    models = tables[0].rows
    out = ["# rejalign report", ""]
    for t in tables:
        out += [f"## {t.section.title}", "", render_markdown_table(t), ""]
        by_task: dict[str, list[str]] = {}
        for rc in t.columns:
            by_task.setdefault(rc.task, []).append(f"`{rc.column.metric}`")
        out.append(
            "Source: "
            + "; ".join(f"task `{task}`, metric(s) {', '.join(ms)}" for task, ms in by_task.items())
            + "."
        )
        notes = []
        if any(t.cell(r, j).status == NOT_AVAILABLE for r in t.rows for j in range(len(t.columns))):
            notes.append(
                f"{NOT_AVAILABLE}: no evaluated prompt of that category (e.g. a --limit run)."
            )
        if any(t.cell(r, j).status == MISSING for r in t.rows for j in range(len(t.columns))):
            notes.append(f"{MISSING}: the model was not evaluated on that task.")
        if any(_row_limited(t, r) for r in t.rows):
            notes.append("†: evaluated on a subset of the prompts (--limit); see Inputs.")
        out += ([""] + notes if notes else []) + [""]
    if comparisons or comparison_notes:
        out += [f"## Paired comparisons against {baseline}", ""]
        if comparisons:
            c0 = comparisons[0].result
            out += [
                f"Change = model - baseline in percentage points on the same prompts; "
                f"{round(100 * c0.confidence)}% percentile bootstrap interval over prompts "
                f"({c0.resamples} resamples, seed {c0.seed}); exact McNemar test on the "
                "discordant prompts.",
                "",
                comparisons_markdown(comparisons),
                "",
            ]
        pair_notes = [
            f"- {r.model}, {r.column}: {n}." for r in comparisons for n in _pair_notes(r.pairs)
        ]
        pair_notes += [f"- {n}." for n in comparison_notes]
        out += pair_notes + ([""] if pair_notes else [])
    if plot_files or plot_notes:
        out += ["## Figures", ""]
        out += [f"![{p.stem}]({p.name})" for p in plot_files if p.suffix == ".png"]
        out += [f"- {n}" for n in plot_notes] + [""]
    out += [
        "## Inputs",
        "",
        "| Model | Backend | Base | Adapter | Refusal fraction (source) | "
        "Task | Prompts | Results file |",
        "|---|---|---|---|---|---|---:|---|",
    ]
    for m in models:
        frac = _fraction(m)
        if m.manifest_path is not None:
            key = m.refusal_fraction_key
            what = key or "no refusal fraction"
            frac += f" ({what} in {m.manifest_path})"
        elif m.manifest_note:
            frac += f" ({m.manifest_note})"
        for task, run in sorted(m.tasks.items()):
            n = f"{run.n_effective}/{run.n_original}" if run.n_original else str(run.n_effective)
            out.append(
                f"| {_md_escape(m.label)} | {m.backend} | {_md_escape(m.pretrained)} | "
                f"{_md_escape(m.adapter or '-')} | {_md_escape(frac)} | {task} | {n} | "
                f"{run.results_file} |"
            )
    shown = {rc.task for t in tables for rc in t.columns}
    unused = sorted({task for m in models for task in m.tasks} - shown)
    if unused:
        out += [
            "",
            "Not in any table (no column of the spec reads them): "
            + ", ".join(f"`{t}`" for t in unused)
            + ".",
        ]
    superseded = [(m, r) for m in models for r in m.superseded]
    if superseded:
        out += ["", "Superseded (a later run of the same task for the same model counts):"]
        out += [f"- {m.label}: {r.task} in {r.results_file}" for m, r in superseded]
    return "\n".join(out) + "\n"


def write_outputs(out_dir: Path, files: dict[str, str], plot_stage: Path | None) -> list[Path]:
    """Replace the report in ``out_dir`` file by file (each atomically), report.md last.

    Files of an earlier report that this one does not produce (e.g. a figure not drawn now) are
    removed, so the folder never mixes two reports.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    produced = set(files) | ({p.name for p in plot_stage.iterdir()} if plot_stage else set())
    for old in out_dir.iterdir():
        ours = (
            old.name in {"report.md", "cells.csv", "comparisons.csv"}
            or (old.name.startswith("table_") and old.suffix == ".csv")
            or old.stem in PLOT_STEMS
        )
        if ours and old.name not in produced:
            old.unlink()
    written = []
    if plot_stage:
        for p in sorted(plot_stage.iterdir()):
            os.replace(p, out_dir / p.name)
            written.append(out_dir / p.name)
    for name in sorted(files, key=lambda n: n == "report.md"):
        written.append(write_text_atomic(out_dir / name, files[name]))
    return written


def make_report(
    inputs: Sequence[str],
    out_dir: Path,
    *,
    spec: Sequence[Section] | None = None,
    sections: Sequence[str] | None = None,
    allow_missing: bool = False,
    baseline: str | None = None,
    plots: bool = True,
    adapter_roots: Sequence[Path] = (),
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[Path]:
    """Everything ``rejalign-report table`` does; returns the files written."""
    models = load_models(inputs, adapter_roots)
    tables = build_tables(models, spec or default_spec(), sections, allow_missing)
    comparisons, comparison_notes = (
        baseline_comparisons(tables, baseline, resamples=resamples, seed=seed)
        if baseline
        else ([], [])
    )
    files = {"report.md": "", "cells.csv": cells_csv(tables)}
    files.update({f"table_{t.section.key}.csv": table_csv(t) for t in tables})
    if comparisons:
        files["comparisons.csv"] = comparisons_csv(comparisons)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".plots-")) if plots else None
    try:
        plot_files, plot_notes = make_plots(tables, stage) if stage else ([], [])
        files["report.md"] = render_report(
            tables, comparisons, plot_files, plot_notes, comparison_notes, baseline
        )
        return write_outputs(out_dir, files, stage)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


# -- command line --------------------------------------------------------------------------------


def _single_model(spec: str, adapter_roots: Sequence[Path]) -> tuple[ModelRuns, str | None]:
    """A compare operand: a folder or results file of one model, or a samples log (its task)."""
    label, path = parse_input(spec)
    task = None
    if path.is_file() and path.name.startswith("samples_") and path.suffix == ".jsonl":
        stem = path.name[len("samples_") : -len(".jsonl")]
        task, _, ts = stem.rpartition("_")
        results = path.parent / f"results_{ts}.json"
        if not results.is_file():
            raise ReportInputError(f"{path}: its results file {results.name} is not beside it")
        path = results
    models = load_models([f"{label}={path}" if label else str(path)], adapter_roots)
    if len(models) != 1:
        raise ReportInputError(
            f"{spec}: holds runs of {len(models)} models ({', '.join(m.label for m in models)}); "
            "name one model's folder, results file or samples log"
        )
    return models[0], task


def _compare_main(args: argparse.Namespace) -> int:
    roots = [Path(p) for p in args.adapter_root]
    (a, task_a), (b, task_b) = (_single_model(s, roots) for s in (args.a, args.b))
    task = args.task or task_a or task_b
    if task is None:
        common = sorted(set(a.tasks) & set(b.tasks))
        if len(common) != 1:
            raise ReportInputError(
                f"give --task: the two runs share {len(common)} tasks "
                f"({', '.join(common) or 'none'})"
            )
        task = common[0]
    for m in (a, b):
        if task not in m.tasks:
            raise ReportInputError(
                f"{m.label}: no run of task {task!r} (it has {', '.join(sorted(m.tasks))})"
            )
    result, pairs = compare_runs(
        a.tasks[task],
        b.tasks[task],
        args.metric,
        args.filter,
        resamples=args.resamples,
        seed=args.seed,
        confidence=args.confidence,
        ignore_doc_fields=tuple(PROVENANCE_DOC_FIELDS) + tuple(args.ignore_doc_field),
    )
    level = round(100 * result.confidence)
    print(f"{task} {args.metric}: {a.label} -> {b.label} on {result.n} paired prompts")
    print(
        f"  rate {100 * result.rate_a:.2f}% -> {100 * result.rate_b:.2f}%, change "
        f"{_pct(result.delta)} pp, {level}% bootstrap CI [{_pct(result.ci_low)}, "
        f"{_pct(result.ci_high)}] pp ({result.resamples} resamples, seed {result.seed})"
    )
    if result.p_value is None:
        print("  McNemar: not applicable (labels are not 0/1)")
    else:
        print(
            f"  McNemar exact p = {result.p_value:.4g} (discordant: {result.only_a} only in "
            f"{a.label}, {result.only_b} only in {b.label})"
        )
    for line in _pair_notes(pairs):
        print(f"  note: {line}")
    if args.json:
        payload = {
            "task": task,
            "metric": args.metric,
            "filter": args.filter,
            "a": a.label,
            "b": b.label,
            "prompt_text_differs": pairs.prompt_text_differs,
            "images_differ": pairs.images_differ,
            **result.as_dict(),
        }
        write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
    return 0


def _table_main(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec) if args.spec else None
    written = make_report(
        args.inputs,
        Path(args.output_dir),
        spec=spec,
        sections=args.sections.split(",") if args.sections else None,
        allow_missing=args.allow_missing,
        baseline=args.baseline,
        plots=not args.no_plots,
        adapter_roots=[Path(p) for p in args.adapter_root],
        resamples=args.resamples,
        seed=args.seed,
    )
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rejalign-report",
        description="Paper-style tables, plots and paired tests from lm-eval output folders "
        "(written with --log_samples).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--adapter-root",
            action="append",
            default=[],
            metavar="DIR",
            help="also look for adapters (and their rejalign_manifest.json) under "
            "DIR when model_args give a relative path",
        )
        p.add_argument(
            "--resamples",
            type=int,
            default=DEFAULT_RESAMPLES,
            help="bootstrap resamples (default %(default)s)",
        )
        p.add_argument(
            "--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed (default %(default)s)"
        )

    t = sub.add_parser("table", help="tables (Markdown, CSV), figures (PNG, SVG), comparisons")
    t.add_argument(
        "inputs",
        nargs="+",
        metavar="[LABEL=]PATH",
        help="lm-eval --output_path folders or results files; LABEL= names the one "
        "model under PATH",
    )
    t.add_argument("-o", "--output-dir", required=True)
    t.add_argument("--spec", help="YAML table spec replacing the default (see report_spec)")
    t.add_argument("--sections", help="comma-separated section keys to include (default: all)")
    t.add_argument(
        "--allow-missing",
        action="store_true",
        help="show cells of tasks a model lacks as 'missing' instead of failing",
    )
    t.add_argument(
        "--baseline",
        metavar="LABEL",
        help="compare every other model with this one, paired per prompt",
    )
    t.add_argument("--no-plots", action="store_true")
    common(t)
    t.set_defaults(func=_table_main)

    c = sub.add_parser("compare", help="paired comparison of two runs on the same prompts")
    c.add_argument("a", metavar="A", help="[LABEL=]folder, results file or samples_*.jsonl")
    c.add_argument("b", metavar="B", help="the run compared with A (change = B - A)")
    c.add_argument("--task", help="task to compare (default: the one task both runs share)")
    c.add_argument("--metric", default="asr", help="per-sample metric (default %(default)s)")
    c.add_argument("--filter", default="none", help="lm-eval filter (default %(default)s)")
    c.add_argument("--confidence", type=float, default=0.95)
    c.add_argument(
        "--ignore-doc-field",
        action="append",
        default=[],
        metavar="FIELD",
        help="doc field that may differ between the runs (provenance only); "
        f"always ignored: {', '.join(sorted(PROVENANCE_DOC_FIELDS))}",
    )
    c.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    common(c)
    c.set_defaults(func=_compare_main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ReportInputError, SpecError, ValueError) as exc:
        print(f"rejalign-report: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
