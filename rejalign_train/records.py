"""Conversation records on disk: reading LLaVA and messages formats and checking them.

Two on-disk formats are read, each as a JSON array or as JSON Lines (one record a line):

* LLaVA: ``{"id", "image": "a.jpg" | ["a.jpg", ...], "conversations": [{"from": "human" |
  "gpt" | "system", "value": str}, ...]}`` (LLaVA v1.5 mix665k, LLaVA-Med, ShareGPT4V ...).
* messages: ``{"id"?, "messages": [{"role": "user" | "assistant" | "system", "content": str |
  [{"type": "text", "text": str} | {"type": "image"}, ...]}], "images": [str, ...]}`` (the layout
  TRL and LLaMA-Factory read).

Both normalise to one record shape, the one the trainer consumes::

    {"id": str, "images": [str, ...],
     "messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}

where user text keeps one ``<image>`` placeholder per image, in place (written back in either
format by :mod:`rejalign_train.record_writer`).

Files are memory-mapped and indexed once by msgspec (a C JSON scanner): a JSON array becomes one
small dict of undecoded value slices per record, JSON Lines a pair of byte offsets per line. A
record is parsed only when it is asked for, so a sampler can draw a few thousand records of a
665k-record instruction file without building the other several hundred thousand as Python
objects; memory is the (reclaimable) page cache of the mapped file plus the index. Values are
parsed with the standard ``json`` module, so the records handed out (numbers, key order,
duplicate keys) are exactly what ``json.load`` of the whole file would hold. Input must be
standard JSON: the ``NaN``/``Infinity`` literals Python's ``json`` also accepts are rejected,
with their line and column.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import threading
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

from rejalign_tasks.contracts import IMAGE_PLACEHOLDER

ROLES = ("user", "assistant", "system")
Layout = Literal["json", "jsonl"]

# LLaVA speaker names -> normalised roles ("user"/"assistant" also seen in ShareGPT dumps).
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """A record file or one of its records is unusable.

    The message names the file, the record (0-based position and id, where known) and the field.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        message: str,
        *,
        index: int | None = None,
        record_id: Any = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path)
        self.index = index
        self.record_id = record_id
        self.field = field
        where = self.path
        if index is not None:
            where += f": record {index}"
            if record_id is not None:
                where += f" (id {record_id!r})"
        if field:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


# ----------------------------------------------------------------------------------------------
# Indexed access to raw records


class _IdOnly(msgspec.Struct, gc=False):
    """What the id scan decodes of a JSON Lines record: its id (``null`` counts as absent)."""

    id: str | int | None = None


_MSGSPEC_AT = re.compile(r"at `\$\[(\d+)\]")
# A JSON array is indexed as one dict of undecoded values per record: key order, duplicate keys
# (the last value wins, in the first key's place) and every value's text stay as json sees them.
_FIELDS_ARRAY = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
_ID_LIST = msgspec.json.Decoder(list[str | int | None])
_ID_ONE = msgspec.json.Decoder(_IdOnly)
_NULL = b"null"


def detect_layout(path: str | os.PathLike) -> Layout:
    """``"json"`` for a JSON array, ``"jsonl"`` for JSON Lines, from the first non-blank byte."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
        while head and not head.lstrip(b" \t\r\n\xef\xbb\xbf"):
            head = fh.read(4096)
    head = head.lstrip(b" \t\r\n\xef\xbb\xbf")
    if not head:
        raise RecordError(path, "empty file: no records")
    if head[:1] == b"[":
        return "json"
    if head[:1] == b"{":
        return "jsonl"
    raise RecordError(
        path,
        f"neither a JSON array nor JSON Lines of objects (starts with {head[:20]!r})",
    )


class RecordFile:
    """Random access to the raw records of one file, parsing only those asked for.

    ``len()`` counts records, :meth:`load` parses one record with ``json`` (exactly what
    ``json.load`` of the whole file would hold at that position), :meth:`ids` scans every
    record's ``"id"`` in C. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, *, sha256: bool = False) -> None:
        """Map and index ``path``; with ``sha256``, hash it in a thread from the start (the
        hashing thread then also faults the pages in, ahead of the indexing scan)."""
        self.path = Path(path)
        try:
            self.layout: Layout = detect_layout(self.path)
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise RecordError(self.path, f"cannot open ({exc})") from exc
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        # JSON array: each record's values as zero-copy slices of the map, keyed by field.
        self._fields: list[dict[str, msgspec.Raw]] | None = None
        self._offsets: array | None = None  # JSON Lines: start/end byte of each record line
        self._digest_thread: threading.Thread | None = None
        self._digest: str | BaseException | None = None
        if sha256:
            self.start_sha256()
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    # -- life cycle
    def close(self) -> None:
        if self._digest_thread is not None:
            self._digest_thread.join()  # it reads the map
        self._fields = None  # the slices pin the map: drop them first
        if not self._mm.closed:
            self._mm.close()
        self._fh.close()

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- indexing
    def _index(self) -> None:
        if self.layout == "json":
            try:
                self._fields = _FIELDS_ARRAY.decode(self._mm)
            except msgspec.ValidationError as exc:
                raise self._scan_error(exc, None) from exc
            except msgspec.DecodeError as exc:
                raise self._syntax_error(exc) from exc
        else:
            self._offsets = self._line_offsets()
        if len(self) == 0:
            raise RecordError(self.path, "no records (empty data)")

    def _line_offsets(self) -> array:
        """Start and end of every non-blank line (JSON Lines allows blank lines nowhere but we
        tolerate them, as ``datasets`` does)."""
        mm, offsets, pos, size = self._mm, array("q"), 0, len(self._mm)
        while pos < size:
            end = mm.find(b"\n", pos)
            if end < 0:
                end = size
            if mm[pos:end].strip():
                offsets.append(pos)
                offsets.append(end)
            pos = end + 1
        return offsets

    def __len__(self) -> int:
        if self._fields is not None:
            return len(self._fields)
        return len(self._offsets) // 2 if self._offsets is not None else 0

    def _where(self, index: int) -> str:
        if self.layout == "jsonl":
            line = self._mm[: self._offsets[2 * index]].count(b"\n") + 1
            return f" (line {line})"
        return ""

    def load(self, index: int) -> dict:
        """Record ``index`` as ``json`` parses it; it must be a JSON object."""
        if self._fields is not None:
            return {key: json.loads(bytes(value)) for key, value in self._fields[index].items()}
        try:
            value = json.loads(self._mm[self._offsets[2 * index] : self._offsets[2 * index + 1]])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(
                self.path, f"invalid JSON{self._where(index)}: {exc}", index=index
            ) from exc
        if not isinstance(value, dict):
            raise RecordError(
                self.path,
                f"a record must be a JSON object, got {type(value).__name__}{self._where(index)}",
                index=index,
            )
        return value

    def ids(self) -> list[str | int | None]:
        """Every record's ``"id"`` (``None`` where absent or null), decoded in C.

        An id must be a string or an integer; anything else is a :class:`RecordError`.
        """
        if self._fields is not None:
            joined = b",".join([fields.get("id", _NULL) for fields in self._fields])
            try:
                return _ID_LIST.decode(b"[" + joined + b"]")
            except msgspec.ValidationError as exc:
                raise self._scan_error(exc, None) from exc
        ids: list[str | int | None] = []
        offsets, mm = self._offsets, self._mm
        for i in range(len(offsets) // 2):
            try:
                r = _ID_ONE.decode(mm[offsets[2 * i] : offsets[2 * i + 1]])
            except msgspec.ValidationError as exc:
                raise self._scan_error(exc, i) from exc
            except msgspec.DecodeError as exc:
                raise RecordError(
                    self.path, f"invalid JSON{self._where(i)}: {exc}", index=i
                ) from exc
            ids.append(r.id)
        return ids

    def _syntax_error(self, exc: msgspec.DecodeError) -> RecordError:
        """Name the line and column of a syntax error (NaN and Infinity are not JSON either)."""
        message, found = str(exc), re.search(r"\(byte (\d+)\)", str(exc))
        if found:
            offset = int(found.group(1))
            line = self._mm[:offset].count(b"\n") + 1
            column = offset - (self._mm.rfind(b"\n", 0, offset) + 1) + 1
            message += f" at line {line}, column {column}"
        return RecordError(self.path, f"not a valid JSON array of records ({message})")

    def _scan_error(self, exc: msgspec.ValidationError, index: int | None) -> RecordError:
        message = str(exc)
        if index is None:
            found = _MSGSPEC_AT.search(message)
            index = int(found.group(1)) if found else None
        message = re.sub(r"\s*-\s*at `\$[^`]*`", "", message)
        if message.startswith("Expected `object`"):
            return RecordError(
                self.path, f"a record must be a JSON object ({message})", index=index
            )
        return RecordError(
            self.path,
            f"an id must be a string or an integer ({message})",
            index=index,
            field="id",
        )

    def sha256(self) -> str:
        """sha256 of the file's bytes (computed once; see :meth:`start_sha256`)."""
        self.start_sha256()
        assert self._digest_thread is not None
        self._digest_thread.join()
        if isinstance(self._digest, BaseException):
            raise self._digest
        return self._digest

    def start_sha256(self) -> None:
        """Hash the file in a thread while the caller scans it (hashlib releases the GIL)."""
        if self._digest_thread is None:
            self._digest_thread = threading.Thread(target=self._hash, daemon=True)
            self._digest_thread.start()

    def _hash(self) -> None:
        try:
            digest = hashlib.sha256()
            with memoryview(self._mm) as view:
                digest.update(view)
            self._digest = digest.hexdigest()
        except BaseException as exc:  # re-raised by sha256()
            self._digest = exc


# ----------------------------------------------------------------------------------------------
# Normalisation and checks


def _content_text(content: Any, path: Path, index: int, rid: Any, field: str) -> tuple[str, int]:
    """Message content -> (text with ``<image>`` placeholders, number of image parts)."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise RecordError(
            path,
            f"content must be a string or a list of parts, got {type(content).__name__}",
            index=index,
            record_id=rid,
            field=field,
        )
    pieces, images = [], 0
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
            images += 1
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise RecordError(
                path,
                'a content part must be {"type": "text", "text": str} or {"type": "image"}',
                index=index,
                record_id=rid,
                field=f"{field}[{k}]",
            )
    return "\n".join(pieces), images


def _image_list(value: Any, path: Path, index: int, rid: Any, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise RecordError(
        path,
        "must be an image path or a list of image paths",
        index=index,
        record_id=rid,
        field=field,
    )


def normalise(raw: Any, path: str | os.PathLike, index: int, *, check_images: bool = True) -> dict:
    """One raw record (either format) -> the normalised record, checked.

    Errors (:class:`RecordError`) name the file, the record and the field: not an object, an id
    that is neither string nor integer, no conversation, an unknown role, non-text content, no
    assistant turn, or (unless ``check_images`` is off, for a caller that rewrites the
    placeholders and checks afterwards) a number of ``<image>`` placeholders different from the
    number of images.
    """
    if not isinstance(path, Path):
        path = Path(path)
    if not isinstance(raw, dict):
        raise RecordError(path, "a record must be a JSON object", index=index)
    rid = raw.get("id")
    if rid is not None and (not isinstance(rid, (str, int)) or isinstance(rid, bool)):
        raise RecordError(
            path, "an id must be a string or an integer", index=index, record_id=rid, field="id"
        )
    messages: list[dict[str, str]] = []
    image_parts = 0
    if "conversations" in raw:
        turns, fmt = raw["conversations"], "conversations"
        images = _image_list(raw.get("image"), path, index, rid, "image")
    elif "messages" in raw:
        turns, fmt = raw["messages"], "messages"
        images = _image_list(
            raw["images"] if "images" in raw else raw.get("image"),
            path,
            index,
            rid,
            "images" if "images" in raw else "image",
        )
    else:
        raise RecordError(
            path,
            "no conversation: expected 'conversations' (LLaVA format) or 'messages'",
            index=index,
            record_id=rid,
        )
    if not isinstance(turns, list) or not turns:
        raise RecordError(
            path, "must be a non-empty list of turns", index=index, record_id=rid, field=fmt
        )
    for j, turn in enumerate(turns):
        where = f"{fmt}[{j}]"
        if not isinstance(turn, dict):
            raise RecordError(
                path, "a turn must be a JSON object", index=index, record_id=rid, field=where
            )
        if fmt == "conversations":
            speaker, content = turn.get("from"), turn.get("value")
            role = _LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
            if role is None:
                raise RecordError(
                    path,
                    f"unknown speaker {speaker!r} (expected one of {sorted(_LLAVA_ROLES)})",
                    index=index,
                    record_id=rid,
                    field=f"{where}.from",
                )
            if not isinstance(content, str):
                raise RecordError(
                    path,
                    f"must be a string, got {type(content).__name__}",
                    index=index,
                    record_id=rid,
                    field=f"{where}.value",
                )
        else:
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                raise RecordError(
                    path,
                    f"unknown role {role!r} (expected one of {list(ROLES)})",
                    index=index,
                    record_id=rid,
                    field=f"{where}.role",
                )
            content, parts = _content_text(content, path, index, rid, f"{where}.content")
            image_parts += parts
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(
            path,
            "no assistant turn: nothing to learn from this record",
            index=index,
            record_id=rid,
            field=fmt,
        )
    if check_images:
        check_placeholders(messages, images, path, index, rid)
    record_id = str(rid) if rid is not None else f"{path.name}:{index}"
    return {"id": record_id, "images": images, "messages": messages}


def check_placeholders(
    messages: list[dict[str, str]], images: list[str], path: str | os.PathLike, index: int, rid: Any
) -> None:
    """Every image has exactly one ``<image>`` in user text, and nowhere else is one."""
    for j, message in enumerate(messages):
        if message["role"] != "user" and IMAGE_PLACEHOLDER in message["content"]:
            raise RecordError(
                path,
                f"{IMAGE_PLACEHOLDER} appears in a {message['role']} turn; only user turns may "
                "hold images",
                index=index,
                record_id=rid,
                field=f"turn {j}",
            )
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if count != len(images):
        raise RecordError(
            path,
            f"{count} {IMAGE_PLACEHOLDER} placeholder(s) in the user text but "
            f"{len(images)} image(s)",
            index=index,
            record_id=rid,
            field="images",
        )


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """Stream the normalised, checked records of a LLaVA or messages file (JSON array or JSONL).

    The file is indexed first (so an unreadable file fails before the first record is yielded);
    each record is then parsed and checked as it is yielded.
    """
    with RecordFile(path) as source:
        for index in range(len(source)):
            yield normalise(source.load(index), source.path, index)
