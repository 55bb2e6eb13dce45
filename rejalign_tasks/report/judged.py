"""Second-stage judges in the report: their metrics as extra columns, and how far judges agree.

``rejalign-judge`` writes ``judged_<judge>_<ts>.json`` beside ``results_<ts>.json`` (the judged
metrics of each task, lm-eval's ``"<metric>,none"`` form) and a judged copy of each samples file
(:mod:`rejalign_tasks.judge.run`). :func:`attach_judged` merges both into a :class:`TaskRun`:
the metrics into ``run.metrics``, the per-sample values into its samples, so every judged number
is checked against the per-sample labels like any other. A judged copy made from another samples
file (its recorded sha256 differs) is an error.

:func:`judge_section` adds a table of ASR by judge (the paper's string judge ``asr``, the rule
judge ``asr_rule`` where the tasks report it, each model judge ``asr_<judge>``), and
:func:`agreement_rows` the agreement between every two judges per model and task: the share of
samples on which their per-sample attack-success labels agree, and Cohen's kappa. XSTest tasks
have no attack success: there the judges' refusal labels are compared.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rejalign_tasks.contracts import sha256_file
from rejalign_tasks.report.errors import ReportInputError
from rejalign_tasks.report.samples import read_samples
from rejalign_tasks.report.spec import Column, Section

if TYPE_CHECKING:
    from rejalign_tasks.report.logs import ModelRuns, TaskRun

_JUDGED = re.compile(r"^judged_(?P<judge>[a-z0-9\-]+)_(?P<ts>\d{4}-\d{2}-\d{2}T[0-9.\-]+)\.json$")
PAPER = "paper"
RULE = "rule"


def judged_files(results_file: Path) -> list[tuple[str, Path]]:
    """(judge, metrics file) beside a results file, for its timestamp."""
    ts = results_file.name[len("results_") : -len(".json")]
    out = []
    for path in sorted(results_file.parent.glob(f"judged_*_{ts}.json")):
        m = _JUDGED.match(path.name)
        if m and m.group("ts") == ts:
            out.append((m.group("judge"), path))
    return out


def attach_judged(runs: Sequence[TaskRun]) -> None:
    """Merge every judged metrics file beside the runs' results file into them."""
    if not runs:
        return
    by_task = {r.task: r for r in runs}
    for judge, path in judged_files(runs[0].results_file):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReportInputError(f"{path}: not a readable judged metrics file ({exc})") from exc
        results, samples = data.get("results") or {}, data.get("samples") or {}
        for task, metrics in results.items():
            run = by_task.get(task)
            if run is None:
                raise ReportInputError(
                    f"{path}: task {task!r} is not in {runs[0].results_file.name}"
                )
            info = samples.get(task) or {}
            judged = path.parent / str(info.get("judged", ""))
            if not info.get("judged") or not judged.is_file():
                raise ReportInputError(
                    f"{path}: the judged samples of task {task!r} ({info.get('judged')}) are "
                    "missing; rerun rejalign-judge"
                )
            if info.get("input_sha256") != sha256_file(run.samples_file):
                raise ReportInputError(
                    f"{judged}: judged from another version of {run.samples_file.name} (sha256 "
                    "differs); rerun rejalign-judge"
                )
            run.metrics.update({k: v for k, v in metrics.items() if "," in k})
            run.judged[judge] = judged


def merge_judged_samples(run: TaskRun, samples: list[dict]) -> None:
    """Add each judged copy's per-sample judge values (``asr_<j>``... and ``judge`` as
    ``judge:<name>``) to the run's samples, matched by doc_id and filter."""
    for judge, path in run.judged.items():
        rows = {(r["doc_id"], r.get("filter", "none")): r for r in read_samples(path)}
        slug = judge.replace("-", "_")
        for s in samples:
            row = rows.get((s["doc_id"], s.get("filter", "none")))
            if row is None:
                raise ReportInputError(f"{path}: no judged row for doc_id {s['doc_id']}")
            for key, value in row.items():
                if key == "judge":
                    s[f"judge:{judge}"] = value
                elif key not in s and (f"_{slug}" in key):
                    s[key] = value


# -- columns -------------------------------------------------------------------------------------


def _judge_metric(task: str, judge: str) -> str:
    """The per-sample attack-success metric of ``judge`` (paper, rule or a model judge)."""
    if judge == PAPER:
        return "asr"
    return f"asr_{judge.replace('-', '_')}"


def _has(run: TaskRun, metric: str) -> bool:
    return f"{metric},none" in run.metrics


def judges_of(models: Sequence[ModelRuns], task: str) -> list[str]:
    """The judges every model evaluated on ``task`` has ASR for: paper, rule, model judges."""
    runs = [m.tasks[task] for m in models if task in m.tasks]
    names = [PAPER, RULE] + sorted({j for r in runs for j in r.judged})
    return [j for j in names if runs and all(_has(r, _judge_metric(task, j)) for r in runs)]


def judge_section(models: Sequence[ModelRuns]) -> Section | None:
    """ASR (%) by judge, one column per task and judge, for the tasks a model judge judged."""
    tasks = sorted({t for m in models for t in m.tasks})
    columns = []
    for task in tasks:
        judges = judges_of(models, task)
        if not set(judges) - {PAPER, RULE}:
            continue
        for judge in judges:
            name = {PAPER: "paper judge", RULE: "rule judge"}.get(judge, judge)
            columns.append(Column(f"{task}: {name}", (task,), _judge_metric(task, judge)))
    if not columns:
        return None
    return Section(
        "judges",
        "ASR (%) by judge: the paper's string judge, the rule judge, and model judges "
        "(rejalign-judge)",
        tuple(columns),
    )


# -- agreement -----------------------------------------------------------------------------------


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float:
    """Cohen's kappa of two binary label lists (NaN when chance agreement is 1)."""
    n = len(a)
    if n == 0 or n != len(b):
        raise ValueError("kappa needs two label lists of the same, non-zero length")
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return math.nan if pe >= 1 else (po - pe) / (1 - pe)


@dataclass(frozen=True)
class Agreement:
    model: str
    task: str
    kind: str  # "attack success" or "refusal"
    judge_a: str
    judge_b: str
    n: int
    agreement: float
    kappa: float


def _refusal_labels(run: TaskRun, judge: str) -> dict[int, float | None] | None:
    """XSTest: per-sample refusal of ``judge`` (over_refusal on safe, unsafe_refusal on unsafe
    prompts), or None when the judge has no refusal labels."""
    slug = {PAPER: "", RULE: "_rule"}.get(judge, "_" + judge.replace("-", "_"))
    metrics = [m for m in (f"over_refusal{slug}", f"unsafe_refusal{slug}") if _has(run, m)]
    if not metrics:
        return None
    labels: dict[int, float | None] = {}
    for metric in metrics:  # each sample has a value for one of the two (its prompt's label)
        for doc_id, value in run.per_sample(metric).items():
            if labels.get(doc_id) is None:
                labels[doc_id] = value
    return labels


def agreement_rows(models: Sequence[ModelRuns]) -> list[Agreement]:
    """Every two judges per model and task, over the samples both labelled."""
    out = []
    for m in models:
        for task, run in sorted(m.tasks.items()):
            judges = [PAPER, RULE, *sorted(run.judged)]
            labels: dict[str, dict[int, float | None]] = {}
            kind = "attack success"
            if task.startswith("rejalign_xstest"):
                kind = "refusal"
                for j in judges:
                    got = _refusal_labels(run, j)
                    if got is not None:
                        labels[j] = got
            else:
                for j in judges:
                    if _has(run, _judge_metric(task, j)):
                        labels[j] = run.per_sample(_judge_metric(task, j))
            names = list(labels)
            if len(names) < 2 or not run.judged:
                continue
            for i, ja in enumerate(names):
                for jb in names[i + 1 :]:
                    pairs = [
                        (int(x), int(labels[jb][d]))
                        for d, x in labels[ja].items()
                        if x is not None and labels[jb].get(d) is not None
                    ]
                    if not pairs:
                        continue
                    a, b = zip(*pairs, strict=True)
                    agree = sum(x == y for x, y in pairs) / len(pairs)
                    out.append(Agreement(m.label, task, kind, ja, jb, len(pairs), agree,
                                         cohen_kappa(a, b)))
    return out


def _judge_name(judge: str) -> str:
    return {PAPER: "paper judge", RULE: "rule judge"}.get(judge, judge)


def agreement_markdown(rows: Sequence[Agreement]) -> str:
    lines = [
        "| Model | Task | Labels | Judge A | Judge B | Samples | Agreement (%) | Cohen's κ |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        kappa = "n/a" if math.isnan(r.kappa) else f"{r.kappa:.3f}"
        lines.append(
            f"| {r.model} | {r.task} | {r.kind} | {_judge_name(r.judge_a)} | "
            f"{_judge_name(r.judge_b)} | {r.n} | {100 * r.agreement:.1f} | {kappa} |"
        )
    return "\n".join(lines)


def agreement_csv(rows: Sequence[Agreement]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "task", "labels", "judge_a", "judge_b", "n", "agreement", "kappa"])
    for r in rows:
        w.writerow([r.model, r.task, r.kind, r.judge_a, r.judge_b, r.n, repr(r.agreement),
                    "" if math.isnan(r.kappa) else repr(r.kappa)])
    return buf.getvalue()
