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
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rejalign_tasks.console import run_command
from rejalign_tasks.contracts import write_text_atomic
from rejalign_tasks.report.compare import compare_runs, pair_notes, pct
from rejalign_tasks.report.errors import ReportInputError
from rejalign_tasks.report.logs import ModelRuns, load_models, parse_input
from rejalign_tasks.report.report import make_report
from rejalign_tasks.report.samples import PROVENANCE_DOC_FIELDS
from rejalign_tasks.report.spec import SpecError, load_spec
from rejalign_tasks.report.stats import DEFAULT_RESAMPLES, DEFAULT_SEED

PROG = "rejalign-report"


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
        f"{pct(result.delta)} pp, {level}% bootstrap CI [{pct(result.ci_low)}, "
        f"{pct(result.ci_high)}] pp ({result.resamples} resamples, seed {result.seed})"
    )
    if result.p_value is None:
        print("  McNemar: not applicable (labels are not 0/1)")
    else:
        print(
            f"  McNemar exact p = {result.p_value:.4g} (discordant: {result.only_a} only in "
            f"{a.label}, {result.only_b} only in {b.label})"
        )
    for line in pair_notes(pairs):
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
        prog=PROG,
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


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``rejalign-report``): 0 done, 2 bad input (one line, no traceback)."""
    return run_command(PROG, _run, argv, usage_errors=(ReportInputError, SpecError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
