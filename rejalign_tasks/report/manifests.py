"""Adapter manifests (``rejalign_manifest.json``): finding an evaluated adapter's manifest and
reading the refusal fraction it was trained with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rejalign_tasks.benchmarks.data import DataFormatError, read_json
from rejalign_tasks.contracts import MANIFEST_NAME
from rejalign_tasks.report.errors import ReportInputError


def find_manifest(
    adapter: str, roots: Sequence[Path], evaluated_by: Iterable[Path] = ()
) -> tuple[dict[str, Any], Path] | None:
    """The adapter's ``rejalign_manifest.json`` and its path, or None where there is none.

    The adapter's path in model_args may be relative (see :func:`resolve_adapter_candidates`).
    ``evaluated_by`` are the results files of the adapter's runs, named when its training did
    not complete.
    """
    for folder in resolve_adapter_candidates(adapter, roots):
        manifest = folder / MANIFEST_NAME
        if manifest.is_file():
            try:
                data = read_json(manifest)
            except DataFormatError as exc:
                raise ReportInputError(str(exc)) from exc
            if not isinstance(data, dict):
                raise ReportInputError(f"{manifest}: not a JSON object")
            if data.get("complete") is False:
                files = sorted({str(f) for f in evaluated_by})
                raise ReportInputError(
                    f"{manifest}: the adapter's training did not complete (complete: false); "
                    f"{', '.join(files)} evaluated an unfinished adapter"
                )
            return data, manifest
    return None


def resolve_adapter_candidates(adapter: str, roots: Sequence[Path]) -> list[Path]:
    """Where an adapter path from model_args may be: as given, else under each root's ancestors.

    lm-eval logs the path exactly as typed, relative to wherever lm_eval ran.
    """
    path = Path(adapter).expanduser()
    if path.is_absolute():
        return [path]
    out = [Path.cwd() / path]
    for root in roots:
        root = Path(root).resolve()
        out.extend(base / path for base in (root, *root.parents))
    return list(dict.fromkeys(out))


# Where the refusal fraction may sit in a manifest, tried in order: the mix manifest that
# ``rejalign-train fit`` embeds in the adapter's manifest (what the data was mixed at), a bare
# fraction (a ``rejalign-train mix`` manifest, or one written by hand), then record counts.
FRACTION_KEYS: tuple[tuple[str, ...], ...] = (
    ("data", "mix_manifest", "refusal_fraction"),
    ("data", "refusal_fraction"),
    ("refusal_fraction",),
)
# (refusal count, other count, whether the other count is the total): the mix manifest's counts,
# else the records ``fit`` actually trained on (after skipping over-long ones).
COUNT_KEYS: tuple[tuple[tuple[str, ...], tuple[str, ...], bool], ...] = (
    (
        ("data", "mix_manifest", "counts", "refusal"),
        ("data", "mix_manifest", "counts", "normal"),
        False,
    ),
    (("counts", "refusal"), ("counts", "normal"), False),
    (("data", "refusal_samples"), ("data", "used"), True),
)


def _dig(data: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def refusal_fraction_source(
    manifest: dict[str, Any], path: Path | None = None
) -> tuple[float, str] | None:
    """The refusal fraction an adapter was trained with and the manifest key it came from.

    None when the manifest holds none of :data:`FRACTION_KEYS` / :data:`COUNT_KEYS`. A value
    that is not a fraction in [0, 1], or counts that are not counts, are errors.
    """
    where = path or MANIFEST_NAME
    for keys in FRACTION_KEYS:
        value = _dig(manifest, keys)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ReportInputError(
                f"{where}: {'.'.join(keys)} = {value!r} is not a fraction in [0, 1]"
            )
        return float(value), ".".join(keys)
    for refusal_keys, other_keys, other_is_total in COUNT_KEYS:
        refusal, other = _dig(manifest, refusal_keys), _dig(manifest, other_keys)
        if refusal is None or other is None:
            continue
        total = (
            other
            if other_is_total
            else (refusal + other if _is_count(refusal) and _is_count(other) else None)
        )
        if not (_is_count(refusal) and _is_count(other)) or not total or refusal > total:
            raise ReportInputError(
                f"{where}: {'.'.join(refusal_keys)} = {refusal!r}, {'.'.join(other_keys)} = "
                f"{other!r}: not usable record counts"
            )
        return refusal / total, f"{'.'.join(refusal_keys)} / " + (
            ".".join(other_keys)
            if other_is_total
            else f"({'.'.join(refusal_keys)} + {'.'.join(other_keys)})"
        )
    return None


def manifest_refusal_fraction(manifest: dict[str, Any], path: Path | None = None) -> float | None:
    found = refusal_fraction_source(manifest, path)
    return None if found is None else found[0]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
