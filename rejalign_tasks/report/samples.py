"""Per-sample logs (``samples_<task>_<ts>.jsonl``): reading them, and pairing two runs' samples.

A paired comparison needs both runs on the same documents; the rendered text prompt and the
logged image hashes may differ between the runs (chat templates, renderer versions), and those
pairs are counted rather than refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rejalign_tasks.report.errors import ReportInputError

if TYPE_CHECKING:
    from rejalign_tasks.report.logs import TaskRun


def read_samples(path: Path) -> list[dict]:
    lines = []
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise ReportInputError(f"{path}: cannot open ({exc})") from exc
    with fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                sample = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ReportInputError(
                    f"{path}: line {lineno} is not JSON ({exc.msg}); truncated log?"
                ) from exc
            if not isinstance(sample, dict):
                raise ReportInputError(f"{path}: line {lineno} is not a JSON object")
            for key in ("doc_id", "doc_hash"):
                if key not in sample:
                    raise ReportInputError(f"{path}: line {lineno} has no {key!r} field")
            lines.append(sample)
    if not lines:
        raise ReportInputError(f"{path}: empty per-sample log")
    return lines


# Doc fields that record where something came from, not what was asked, and differ between
# machines: the FigStep/TYPO font's file path (its sha256, also in the doc, pins the glyphs) and
# MM-SafetyBench's SD image source (a local folder or the Hub; the images themselves are compared
# by their logged hashes).
PROVENANCE_DOC_FIELDS = frozenset({"font_file", "image_source"})


@dataclass
class PairedLabels:
    doc_ids: list[int]
    a: list[float]
    b: list[float]
    prompt_text_differs: int  # pairs whose rendered text prompt differs (e.g. chat templates)
    images_differ: int  # pairs whose logged image hashes differ (e.g. other renderer versions)


def paired_labels(
    run_a: TaskRun,
    run_b: TaskRun,
    metric: str,
    filter_name: str = "none",
    ignore_doc_fields: Iterable[str] = PROVENANCE_DOC_FIELDS,
) -> PairedLabels:
    """Per-prompt labels of two runs, paired by document; unequal prompt sets are an error.

    Documents pair by doc_id and must be the same document (equal ``doc_hash``, or equal docs
    once ``ignore_doc_fields`` are dropped). The rendered text prompt (chat templates differ
    between models) and the images (lm-eval logs the sha256 of their PNG encoding, which changes
    with font-rasteriser and PNG-encoder versions) may differ; those pairs are counted. Samples
    where the metric does not apply in both runs (``None``) are left out.
    """
    ignore = frozenset(ignore_doc_fields)
    sa = {s["doc_id"]: s for s in run_a.samples(filter_name)}
    sb = {s["doc_id"]: s for s in run_b.samples(filter_name)}
    if sa.keys() != sb.keys():
        only_a = sorted(sa.keys() - sb.keys())
        only_b = sorted(sb.keys() - sa.keys())
        raise ReportInputError(
            f"unequal prompt sets: {run_a.samples_file} has {len(sa)} prompts, "
            f"{run_b.samples_file} has {len(sb)}; {len(only_a)} only in the first"
            f"{_ids(only_a)}, {len(only_b)} only in the second{_ids(only_b)}. A paired "
            "comparison needs both runs on the same prompts (same task, same --limit)"
        )
    va = run_a.per_sample(metric, filter_name)
    vb = run_b.per_sample(metric, filter_name)
    out = PairedLabels([], [], [], 0, 0)
    for doc_id in sorted(sa):
        x, y = sa[doc_id], sb[doc_id]
        if x["doc_hash"] != y["doc_hash"]:
            dx, dy = x.get("doc") or {}, y.get("doc") or {}
            differ = sorted(
                k for k in set(dx) | set(dy) if k not in ignore and dx.get(k) != dy.get(k)
            )
            if differ or not dx:
                raise ReportInputError(
                    f"unequal prompt sets: doc_id {doc_id} is a different document in "
                    f"{run_a.samples_file} and {run_b.samples_file} (fields differing: "
                    f"{', '.join(differ) or 'doc not logged'})"
                )
        if _visuals(x) != _visuals(y):
            out.images_differ += 1
        if _prompt_text(x) != _prompt_text(y):
            out.prompt_text_differs += 1
        if (va[doc_id] is None) != (vb[doc_id] is None):
            raise ReportInputError(
                f"doc_id {doc_id}: metric {metric!r} applies in one run but not the other "
                f"({run_a.samples_file.name}: {va[doc_id]!r}, {run_b.samples_file.name}: "
                f"{vb[doc_id]!r})"
            )
        if va[doc_id] is None:
            continue
        out.doc_ids.append(doc_id)
        out.a.append(va[doc_id])
        out.b.append(vb[doc_id])
    if not out.doc_ids:
        raise ReportInputError(
            f"metric {metric!r} applies to none of the {len(sa)} paired prompts of "
            f"{run_a.task!r}; nothing to compare"
        )
    return out


def _ids(ids: list[int], k: int = 5) -> str:
    if not ids:
        return ""
    return " (doc_id " + ", ".join(map(str, ids[:k])) + (", ..." if len(ids) > k else "") + ")"


def _args(sample: dict) -> list:
    args = sample.get("arguments") or {}
    if isinstance(args, dict):
        return [args[k] for k in sorted(args)]
    return list(args)


def _visuals(sample: dict) -> list:
    out = []
    for arg in _args(sample):
        values = list(arg.values()) if isinstance(arg, dict) else list(arg)
        for v in values:
            if isinstance(v, dict) and "visual" in v:
                out.append(v["visual"])
    return out


def _prompt_text(sample: dict) -> list:
    out = []
    for arg in _args(sample):
        values = list(arg.values()) if isinstance(arg, dict) else list(arg)
        if values and isinstance(values[0], str):
            out.append(values[0])
    return out
