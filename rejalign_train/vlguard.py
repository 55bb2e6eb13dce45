"""VLGuard's training metadata as a refusal source of ``rejalign-train mix``.

VLGuard (Zong et al., ICML 2024; GitHub ys-zong/VLGuard, data on the Hub as the gated data set
ys-zong/VLGuard, MIT) ships ``train.json``: one record per image, ``{"id", "image", "safe",
["harmful_category", "harmful_subcategory",] "instr-resp": [...]}``. An unsafe image has one
``{"instruction", "response"}`` (a refusal); a safe image has a ``{"safe_instruction",
"response"}`` (a helpful answer) and an ``{"unsafe_instruction", "response"}`` (a refusal).

Upstream's ``convert_to_llava_format.py`` (GitHub ys-zong/VLGuard, commit
a2f85c90e10345dc5e7eceecadd89c1ed982d04f) turns it into LLaVA records; :func:`convert` restates
it exactly:

* the module-level generator is seeded once (``random.seed(0)``) and, walking the file in order,
  every record with more than one pair has its pair list shuffled (a stream of ``shuffle`` calls,
  so a record's order depends on every record before it: the whole file is always converted);
* the first pair's human turn is ``"<image>" + instruction`` (no newline), the second's the bare
  instruction; the instruction is the pair's *first key* (``list(pair.keys())[0]``), whatever it
  is called; an unsafe image's single pair is read by the key ``instruction``;
* ``conversations`` is appended after the record's own fields and ``instr-resp`` removed.

The paper's ``mix_rejection_data.py`` then reads that file like any LLaVA file (see
:mod:`rejalign_train.mixing`); with ``--random_choose`` its ``<image>`` fix-up turns
``"<image>What ..."`` into ``"<image>\\n<image>What ..."`` (two placeholders, one image): kept in
``--official`` mode, repaired in the default mode.

Subsets for the ablations (chosen after the conversion, so each record is what the whole
conversion made of it): ``all``; ``unsafes`` (the unsafe images); ``safe_unsafes`` (the safe
images, each with its unsafe instruction and refusal only, placed as upstream places a first
pair); ``contrastive`` (the safe images with both pairs: the safe and the unsafe instruction on
the same image).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Literal

from rejalign_tasks.contracts import IMAGE_PLACEHOLDER
from rejalign_train.records import RecordError, RecordFile

PAIRS_FIELD = "instr-resp"
SUBSETS = ("all", "unsafes", "safe_unsafes", "contrastive")
Subset = Literal["all", "unsafes", "safe_unsafes", "contrastive"]
UPSTREAM = (
    "ys-zong/VLGuard@a2f85c90e10345dc5e7eceecadd89c1ed982d04f convert_to_llava_format.py "
    "(random.seed(0))"
)


def is_vlguard(record: Any) -> bool:
    """Whether a raw record is in VLGuard's ``train.json`` format (and not already converted)."""
    return isinstance(record, dict) and PAIRS_FIELD in record and "conversations" not in record


def _pairs(record: dict, path: Path, index: int) -> list[dict]:
    pairs = record.get(PAIRS_FIELD)
    rid = record.get("id")
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, dict) for p in pairs):
        raise RecordError(
            path, "must be a non-empty list of objects", index=index, record_id=rid,
            field=PAIRS_FIELD,
        )
    if len(pairs) > 2:
        raise RecordError(
            path, f"{len(pairs)} instruction/response pairs; VLGuard has one or two",
            index=index, record_id=rid, field=PAIRS_FIELD,
        )
    for j, pair in enumerate(pairs):
        key = "instruction" if len(pairs) == 1 else next(iter(pair), None)
        for name in (key, "response"):
            if not isinstance(pair.get(name), str):
                raise RecordError(
                    path, "must be a string (a VLGuard pair holds an instruction and a response)",
                    index=index, record_id=rid, field=f"{PAIRS_FIELD}[{j}].{name}",
                )
    return pairs


def _turns(key: str, pair: dict, *, prepend_image: bool) -> list[dict]:
    """Upstream's ``format_conversation``."""
    human = f"{IMAGE_PLACEHOLDER}{pair[key]}" if prepend_image else pair[key]
    return [{"from": "human", "value": human}, {"from": "gpt", "value": pair["response"]}]


def convert(records: list[dict], path: str | Path, *, seed: int = 0) -> list[dict]:
    """Upstream's conversion of the whole file (the records are not modified)."""
    path = Path(path)
    rng = random.Random(seed)  # upstream: random.seed(0) once, then random.shuffle per record
    out = []
    for index, raw in enumerate(records):
        if not is_vlguard(raw):
            raise RecordError(
                path, f"not a VLGuard record (no {PAIRS_FIELD!r}, or already converted)",
                index=index, record_id=raw.get("id") if isinstance(raw, dict) else None,
            )
        item = copy.deepcopy(raw)
        pairs = _pairs(item, path, index)
        conversations: list[dict] = []
        if len(pairs) > 1:
            rng.shuffle(pairs)
            conversations += _turns(next(iter(pairs[0])), pairs[0], prepend_image=True)
            conversations += _turns(next(iter(pairs[1])), pairs[1], prepend_image=False)
        else:
            conversations += _turns("instruction", pairs[0], prepend_image=True)
        item["conversations"] = conversations
        item.pop(PAIRS_FIELD)
        out.append(item)
    return out


def select(raws: list[dict], converted: list[dict], subset: Subset, path: Path) -> list[dict]:
    """The records of one subset, from the raw file and its whole conversion (same order)."""
    if subset == "all":
        return converted
    chosen = []
    for index, (raw, conv) in enumerate(zip(raws, converted, strict=True)):
        safe = raw.get("safe")
        if not isinstance(safe, bool):
            raise RecordError(
                path, "must be true or false (whether the image is safe)",
                index=index, record_id=raw.get("id"), field="safe",
            )
        if subset == "unsafes" or subset == "contrastive":
            if safe == (subset == "contrastive"):
                chosen.append(conv)
            continue
        if not safe:
            continue
        unsafe = [p for p in raw[PAIRS_FIELD] if "unsafe_instruction" in p]
        if len(unsafe) != 1:
            raise RecordError(
                path, "a safe image needs exactly one 'unsafe_instruction' pair",
                index=index, record_id=raw.get("id"), field=PAIRS_FIELD,
            )
        kept = {k: v for k, v in conv.items() if k != "conversations"}
        kept["conversations"] = _turns("unsafe_instruction", unsafe[0], prepend_image=True)
        chosen.append(kept)
    return chosen


class VLGuardSource:
    """A VLGuard ``train.json`` converted and subset, with the interface ``mix`` reads of a
    :class:`~rejalign_train.records.RecordFile` (``len``, ``ids``, ``load``, ``sha256``)."""

    layout = "vlguard"

    def __init__(self, source: RecordFile, subset: Subset) -> None:
        self.path = source.path
        self.subset = subset
        self._file = source
        raws = [source.load(i) for i in range(len(source))]
        self.records_in_file = len(raws)
        self._records = select(raws, convert(raws, self.path), subset, self.path)
        if not self._records:
            raise RecordError(self.path, f"no records in the VLGuard subset {subset!r}")

    def __len__(self) -> int:
        return len(self._records)

    def __enter__(self) -> VLGuardSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def ids(self) -> list:
        return [r.get("id") for r in self._records]

    def load(self, index: int) -> dict:
        """A fresh copy (``mix`` edits the records it draws)."""
        return copy.deepcopy(self._records[index])

    def sha256(self) -> str:
        return self._file.sha256()

    def info(self) -> dict[str, Any]:
        """What the manifest says about the conversion."""
        return {
            "conversion": UPSTREAM,
            "subset": self.subset,
            "records_in_file": self.records_in_file,
            "records_in_subset": len(self._records),
        }


def open_refusal_source(path: str | Path, subset: Subset) -> RecordFile | VLGuardSource:
    """The refusal source as ``mix`` reads it: VLGuard's format is detected by its first record."""
    source = RecordFile(path, sha256=True)
    try:
        vlguard = is_vlguard(source.load(0))
    except BaseException:
        source.close()
        raise
    if vlguard:
        try:
            return VLGuardSource(source, subset)
        except BaseException:
            source.close()
            raise
    if subset != "all":
        source.close()
        raise RecordError(
            path, f"--vlguard_subset {subset} needs VLGuard's train.json format "
            f"(records with {PAIRS_FIELD!r})",
        )
    return source
