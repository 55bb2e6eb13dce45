"""Conversation records written back to disk: normalised records (see :mod:`rejalign_train.records`)
in LLaVA or messages format, as a JSON array or JSON Lines, atomically, with their sha256.

Output is byte for byte what ``json`` writes (``indent=4`` and non-ASCII kept for an array, one
compact record a line for JSON Lines); msgspec does the encoding where that is the same text.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from rejalign_tasks.contracts import atomic_path
from rejalign_train.records import Layout

RecordFormat = Literal["llava", "messages"]

# Normalised roles -> LLaVA speaker names.
_LLAVA_SPEAKERS = {"user": "human", "assistant": "gpt", "system": "system"}


def to_llava(record: dict) -> dict:
    """A normalised record in LLaVA format (``image`` a string for one image, a list for more)."""
    out: dict[str, Any] = {"id": record["id"]}
    images = record.get("images") or []
    if len(images) == 1:
        out["image"] = images[0]
    elif images:
        out["image"] = list(images)
    out["conversations"] = [
        {"from": _LLAVA_SPEAKERS[m["role"]], "value": m["content"]} for m in record["messages"]
    ]
    return out


def to_messages(record: dict) -> dict:
    """A normalised record in the messages format (string content, ``<image>`` placeholders)."""
    return {
        "id": record["id"],
        "messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]],
        "images": list(record.get("images") or []),
    }


@dataclass(frozen=True)
class Written:
    """What :func:`write_records` wrote."""

    path: Path
    records: int
    sha256: str


def layout_for(path: str | os.PathLike) -> Layout:
    """``.json`` -> a JSON array; anything else (``.jsonl``, ``.ndjson``...) -> JSON Lines."""
    return "json" if Path(path).suffix.lower() == ".json" else "jsonl"


def write_records(
    path: str | os.PathLike,
    records: Iterable[dict],
    *,
    record_format: RecordFormat | None = "llava",
    layout: Layout | None = None,
) -> Written:
    """Write records atomically (a reader sees the old file or the whole new one).

    ``record_format`` converts normalised records (``"llava"``, ``"messages"``); ``None`` writes
    the dicts as they are. ``layout`` defaults to :func:`layout_for` the path. A JSON array is
    written as upstream LLaVA tools write theirs (``indent=4``, non-ASCII kept), JSON Lines one
    compact record a line.
    """
    path = Path(path)
    layout = layout or layout_for(path)
    convert = {"llava": to_llava, "messages": to_messages, None: None}[record_format]
    rows = (convert(r) for r in records) if convert else iter(records)
    digest, count = hashlib.sha256(), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        if layout == "json":
            rows = list(rows)
            count = len(rows)
            data = dump_json_array(rows)
            fh.write(data)
            digest.update(data)
        else:
            for row in rows:
                line = _encode_line(row)
                fh.write(line)
                digest.update(line)
                count += 1
    return Written(path, count, digest.hexdigest())


def _has_float(value: Any) -> bool:
    """Whether a float occurs anywhere in ``value`` (iterative: records can nest deeply)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            continue
        if isinstance(item, float):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def dump_json_array(rows: list) -> bytes:
    """``json.dumps(rows, ensure_ascii=False, indent=4)`` as UTF-8, byte for byte, fast.

    msgspec writes the same text ten times faster except for floats (``1e16`` where ``json``
    writes ``1e+16``), so records holding a float go through ``json``.
    """
    if not _has_float(rows):
        try:
            return msgspec.json.format(msgspec.json.encode(rows), indent=4)
        except (TypeError, UnicodeEncodeError, OverflowError):
            pass  # json gives the reference behaviour (or error) for anything unusual
    return json.dumps(rows, ensure_ascii=False, indent=4).encode("utf-8")


def _encode_line(row: Any) -> bytes:
    """One JSON Lines record (compact, non-ASCII kept; floats written as ``json`` writes them)."""
    if not _has_float(row):
        try:
            return msgspec.json.encode(row) + b"\n"
        except (TypeError, UnicodeEncodeError, OverflowError):
            pass
    return (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
