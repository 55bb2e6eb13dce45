"""Paired comparisons of two runs on the same prompts: the change in rate with a bootstrap
interval and the exact McNemar p-value, for one pair (``rejalign-report compare``) or every
model against a baseline (``rejalign-report table --baseline``, ``comparisons.csv``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass

from rejalign_tasks.report.errors import ReportInputError
from rejalign_tasks.report.logs import TaskRun
from rejalign_tasks.report.samples import PROVENANCE_DOC_FIELDS, PairedLabels, paired_labels
from rejalign_tasks.report.stats import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    PairedComparison,
    paired_comparison,
)
from rejalign_tasks.report.tables import Table, md_escape


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


def pair_notes(pairs: PairedLabels) -> list[str]:
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


def pct(x: float) -> str:
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
            f"| {md_escape(r.model)} | {md_escape(r.column)} | {100 * c.rate_a:.1f} | "
            f"{100 * c.rate_b:.1f} | {pct(c.delta)} | [{pct(c.ci_low)}, {pct(c.ci_high)}] | "
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
