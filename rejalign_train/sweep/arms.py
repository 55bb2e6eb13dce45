"""The sweep's trained rows: one per refusal fraction, and one per named arm.

A fraction row mixes the sweep's two sources at ``round(fraction x total)`` refusals. An arm is
a named mix configuration of its own, given in the sweep's YAML (``arms:``), for comparisons
that differ in more than the fraction: other sources (VLGuard's curated data against LLaVA-Med
with the refusal sentence), counts, and mix options (``change_reply``, ``vlguard_subset``,
``refusal_images`` ...)::

    arms:
      - name: vlguard-own-responses          # the row's label and folder (OUT/NAME/...)
        refusal_source: vlguard/train.json   # default: the sweep's --refusal-source
        normal_source: llava_v1_5_mix665k.json  # default: the sweep's --normal-source
        image_root: llava/data               # default: as for the sweep's own sources
        num_refusal: 2000                    # or fraction: 0.3 (with total, or --total)
        num_normal: 5000
        mix: {random_choose: true, change_reply: false}   # after the sweep's own mix: options

Each row is mixed, fitted and evaluated in its own folder with the same step cache: an arm's
steps are keyed by everything that makes the arm, so changing one arm redoes that arm only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARM_FIELDS = (
    "name",
    "refusal_source",
    "normal_source",
    "image_root",
    "num_refusal",
    "num_normal",
    "fraction",
    "total",
    "mix",
)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Folder names of the sweep that no arm may take.
TAKEN = ("base", "report")


@dataclass
class Row:
    """One trained row of the sweep: its label (folder and report row) and its mix."""

    label: str
    key: dict[str, Any]  # what defines the mix besides the sources' and options' digests
    refusal_source: str
    normal_source: str | None
    image_root: Path
    sizing: list[str]  # the mix's size options
    mix_argv: list[str]  # the mix's other options
    official: bool = False  # upstream's layout: the mix is written as .json
    refusal_sentence: str | None = None  # a custom single sentence of the mix, for fit
    arm: bool = False

    @property
    def data_name(self) -> str:
        return "mixed.json" if self.official else "mixed.jsonl"


def _count(arm: dict, name: str, where: str, error: type[Exception]) -> int | None:
    value = arm.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(f"{where}: {name} must be a count >= 0, got {value!r}")
    return value


def arm_sizing(arm: dict, total: int | None, where: str, error: type[Exception]) -> list[str]:
    """The mix's size options of an arm: counts, or a fraction of its (or the sweep's) total."""
    k1, k2 = (_count(arm, n, where, error) for n in ("num_refusal", "num_normal"))
    fraction = arm.get("fraction")
    if fraction is not None:
        if k1 is not None or k2 is not None:
            raise error(f"{where}: give either fraction or num_refusal/num_normal, not both")
        total = _count(arm, "total", where, error) if arm.get("total") is not None else total
        if total is None:
            raise error(f"{where}: fraction needs a total (the arm's total: or --total)")
        return ["--refusal_fraction", repr(float(fraction)), "--total", str(total)]
    if arm.get("total") is not None:
        raise error(f"{where}: total goes with fraction; with counts give num_normal")
    if k1 is None:
        raise error(f"{where}: give num_refusal (and num_normal), or fraction")
    return ["--num_refusal", str(k1), "--num_normal", str(k2 or 0)]


def check_arms(value: Any, error: type[Exception]) -> list[dict]:
    """The ``arms:`` list of a configuration: shapes, names and fields (values come later)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
        raise error("arms: expected a list of mappings (name:, sources, sizes, mix:)")
    seen: set[str] = set()
    arms = []
    for i, arm in enumerate(value):
        arm = {str(k).replace("-", "_"): v for k, v in arm.items()}
        name = arm.get("name")
        where = f"arms[{i}]" + (f" ({name})" if name else "")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise error(
                f"{where}: name must be letters, digits, '.', '_' or '-' (it is a folder and "
                f"the report's row label), got {name!r}"
            )
        if name in TAKEN or name.startswith("frac-") or name in seen:
            raise error(
                f"{where}: the name {name!r} is "
                + ("given twice" if name in seen else "the sweep's own (base, report, frac-*)")
            )
        seen.add(name)
        unknown = sorted(set(arm) - set(ARM_FIELDS))
        if unknown:
            raise error(f"{where}: unknown field(s) {', '.join(unknown)} (known: "
                        f"{', '.join(ARM_FIELDS)})")
        arms.append(arm)
    return arms


def row_mix_argv(row: Row, output: Path) -> list[str]:
    """The ``rejalign-train mix`` argument list of one row."""
    argv = ["--refusal_source", str(Path(row.refusal_source).expanduser())]
    if row.normal_source:
        argv += ["--normal_source", str(Path(row.normal_source).expanduser())]
    return argv + row.sizing + ["--output", str(output), *row.mix_argv]
