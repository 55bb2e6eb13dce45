"""The report folder as a whole: ``report.md`` (every table, its sources and notes, the paired
comparisons, the figures, the inputs), the CSV files and the figures, replaced file by file.

:func:`make_report` is everything ``rejalign-report table`` does (see :mod:`.cli`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rejalign_tasks.contracts import write_text_atomic
from rejalign_tasks.report.compare import (
    ComparisonRow,
    baseline_comparisons,
    comparisons_csv,
    comparisons_markdown,
    pair_notes,
)
from rejalign_tasks.report.judged import (
    Agreement,
    agreement_csv,
    agreement_markdown,
    agreement_rows,
    judge_section,
)
from rejalign_tasks.report.logs import load_models
from rejalign_tasks.report.spec import Section, default_spec
from rejalign_tasks.report.stats import DEFAULT_RESAMPLES, DEFAULT_SEED
from rejalign_tasks.report.tables import (
    MISSING,
    NOT_AVAILABLE,
    Table,
    build_tables,
    cells_csv,
    md_escape,
    refusal_fraction_text,
    render_markdown_table,
    row_limited,
    table_csv,
)

PLOT_STEMS = ("asr_vs_refusal_fraction", "safety_tradeoffs")


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
    agreement: Sequence[Agreement] = (),
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
        if any(row_limited(t, r) for r in t.rows):
            notes.append("†: evaluated on a subset of the prompts (--limit); see Inputs.")
        out += ([""] + notes if notes else []) + [""]
    if agreement:
        out += [
            "## Agreement between judges",
            "",
            "Per model and task, over the samples both judges labelled: the share with the same "
            "per-sample label (attack success; for XSTest, refusal) and Cohen's κ.",
            "",
            agreement_markdown(agreement),
            "",
        ]
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
        listed = [
            f"- {r.model}, {r.column}: {n}." for r in comparisons for n in pair_notes(r.pairs)
        ]
        listed += [f"- {n}." for n in comparison_notes]
        out += listed + ([""] if listed else [])
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
        frac = refusal_fraction_text(m)
        if m.manifest_path is not None:
            key = m.refusal_fraction_key
            what = key or "no refusal fraction"
            frac += f" ({what} in {m.manifest_path})"
        elif m.manifest_note:
            frac += f" ({m.manifest_note})"
        for task, run in sorted(m.tasks.items()):
            n = f"{run.n_effective}/{run.n_original}" if run.n_original else str(run.n_effective)
            out.append(
                f"| {md_escape(m.label)} | {m.backend} | {md_escape(m.pretrained)} | "
                f"{md_escape(m.adapter or '-')} | {md_escape(frac)} | {task} | {n} | "
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
            old.name in {"report.md", "cells.csv", "comparisons.csv", "agreement.csv"}
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
    spec = list(spec or default_spec())
    judges = judge_section(models)
    if judges is not None and judges.key not in {s.key for s in spec}:
        spec.append(judges)
    tables = build_tables(models, spec, sections, allow_missing)
    agreement = agreement_rows(models)
    comparisons, comparison_notes = (
        baseline_comparisons(tables, baseline, resamples=resamples, seed=seed)
        if baseline
        else ([], [])
    )
    files = {"report.md": "", "cells.csv": cells_csv(tables)}
    files.update({f"table_{t.section.key}.csv": table_csv(t) for t in tables})
    if comparisons:
        files["comparisons.csv"] = comparisons_csv(comparisons)
    if agreement:
        files["agreement.csv"] = agreement_csv(agreement)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".plots-")) if plots else None
    try:
        plot_files, plot_notes = make_plots(tables, stage) if stage else ([], [])
        files["report.md"] = render_report(
            tables, comparisons, plot_files, plot_notes, comparison_notes, baseline, agreement
        )
        return write_outputs(out_dir, files, stage)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
