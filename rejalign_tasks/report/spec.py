"""What the paper-style report shows: sections of columns, each one task metric.

A column names the lm-eval task(s) it reads (alternatives in order of preference, e.g. the full
benchmark and its tiny version), the metric, and its role in the plots. A column appears when at
least one model was evaluated on one of its tasks; every model in the report must then have it
(the report never fills a gap silently). Users can replace the default spec with a YAML file of
the same shape (``rejalign-report table --spec FILE``)::

    sections:
      - key: main
        title: Safety and utility
        columns:
          - header: FigStep ASR (%)
            tasks: [rejalign_figstep, rejalign_figstep_tiny]
            metric: asr
            role: safety          # safety | over_refusal | utility | (empty)
            higher_is_better: false
            scale: 100            # shown value = metric x scale
            digits: 1
            filter: none
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rejalign_tasks.benchmarks.figstep import TOPICS
from rejalign_tasks.benchmarks.metrics import slug

ROLES = ("safety", "over_refusal", "utility", "")


class SpecError(ValueError):
    """A table spec is malformed; the message names the file, section, column and field."""


@dataclass(frozen=True)
class Column:
    header: str
    tasks: tuple[str, ...]
    metric: str
    role: str = ""
    higher_is_better: bool = False
    scale: float = 100.0
    digits: int = 1
    filter: str = "none"


@dataclass(frozen=True)
class Section:
    key: str  # also the CSV file name: table_<key>.csv
    title: str
    columns: tuple[Column, ...]


FIGSTEP_TASKS = ("rejalign_figstep", "rejalign_figstep_tiny")
XSTEST_TASKS = ("rejalign_xstest",)
XSTEST_TYPO_TASKS = ("rejalign_xstest_typo",)


def _title(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _figstep_topics() -> Section:
    return Section(
        "figstep_topics",
        "FigStep ASR (%) per SafeBench topic",
        (
            Column("All", FIGSTEP_TASKS, "asr"),
            *(Column(name, FIGSTEP_TASKS, f"asr_{slug(name)}") for name in TOPICS.values()),
        ),
    )


def _xstest(key: str, title: str, tasks: tuple[str, ...]) -> Section:
    return Section(
        key,
        title,
        (
            Column("Over-refusal, paper judge", tasks, "over_refusal"),
            Column("Over-refusal, XSTest judge", tasks, "over_refusal_xstest"),
            Column("Partial refusal, safe prompts", tasks, "over_refusal_partial"),
            Column("Unsafe refused, paper judge", tasks, "unsafe_refusal", higher_is_better=True),
            Column(
                "Unsafe refused, XSTest judge",
                tasks,
                "unsafe_refusal_xstest",
                higher_is_better=True,
            ),
        ),
    )


def _xstest_types() -> Section:
    from rejalign_tasks.benchmarks.xstest import SAFE_TYPES, UNSAFE_TYPES

    return Section(
        "xstest_types",
        "XSTest refusal rate (%) per prompt type, paper judge (safe types: lower is better; "
        "contrast types: higher is better)",
        (
            *(Column(_title(t), XSTEST_TASKS, f"refusal_{t}") for t in SAFE_TYPES),
            *(
                Column(_title(t), XSTEST_TASKS, f"refusal_{t}", higher_is_better=True)
                for t in UNSAFE_TYPES
            ),
        ),
    )


MMSAFETY_MODE_NAMES = {"sd_typo": "SD+TYPO", "typo": "TYPO", "sd": "SD", "text": "text-only"}


def _mmsafety_tasks(mode: str) -> tuple[str, ...]:
    return (f"rejalign_mmsafety_{mode}", f"rejalign_mmsafety_{mode}_tiny")


def _mmsafety_scenarios(mode: str) -> Section:
    """Per scenario: ASR where compliance is upstream's unsafe criterion, else compliance."""
    from rejalign_tasks.benchmarks.mmsafetybench import HARMFUL_SLUGS, SPECIAL_SLUGS

    tasks = _mmsafety_tasks(mode)
    return Section(
        f"mmsafety_{mode}",
        f"MM-SafetyBench {MMSAFETY_MODE_NAMES[mode]} (%) per scenario: ASR, except 08 and 10-13, "
        "whose upstream safety criteria a string judge cannot check: their string-judge "
        "compliance rate",
        (
            Column("All 13, paper's ASR", tasks, "compliance_rate"),
            Column("ASR, 8 scenarios", tasks, "asr"),
            *(Column(_title(s), tasks, f"asr_{s}") for s in HARMFUL_SLUGS),
            *(
                Column(f"{_title(s)} (compliance)", tasks, f"compliance_rate_{s}")
                for s in SPECIAL_SLUGS
            ),
        ),
    )


def default_spec() -> tuple[Section, ...]:
    """The paper's table (safety, over-refusal, utility), then per-category detail.

    The headline columns follow the paper: FigStep and MM-SafetyBench SD+TYPO ASR by its string
    judge (for MM-SafetyBench over all 13 scenarios, as upstream's judge_mmbench_str.py counts
    it), XSTest over-refusal on the 250 safe prompts, ScienceQA-IMG accuracy and VizWiz VQA
    accuracy (the paper's exact-match variant); rejalign adds FigStep's text-only baseline and
    XSTest as typographic images.
    """
    main = Section(
        "main",
        "Safety, over-refusal and utility",
        (
            Column("FigStep ASR (%)", FIGSTEP_TASKS, "asr", role="safety"),
            Column(
                "MM-SafetyBench SD+TYPO ASR (%)",
                _mmsafety_tasks("sd_typo"),
                "compliance_rate",
                role="safety",
            ),
            Column("FigStep text-only ASR (%)", ("rejalign_figstep_text",), "asr", role="safety"),
            Column("XSTest over-refusal (%)", XSTEST_TASKS, "over_refusal", role="over_refusal"),
            Column(
                "XSTest-typo over-refusal (%)",
                XSTEST_TYPO_TASKS,
                "over_refusal",
                role="over_refusal",
            ),
            Column(
                "ScienceQA-IMG accuracy (%)",
                ("rejalign_scienceqa_img",),
                "accuracy",
                role="utility",
                higher_is_better=True,
            ),
            Column(
                "VizWiz VQA accuracy (%)",
                ("rejalign_vizwiz",),
                "vqa_acc",
                role="utility",
                higher_is_better=True,
            ),
        ),
    )
    return (
        main,
        _figstep_topics(),
        *(_mmsafety_scenarios(mode) for mode in MMSAFETY_MODE_NAMES),
        _xstest("xstest", "XSTest (%), text prompts", XSTEST_TASKS),
        _xstest("xstest_typo", "XSTest-typo (%), prompts as typographic images", XSTEST_TYPO_TASKS),
        _xstest_types(),
    )


def load_spec(path: str | Path) -> tuple[Section, ...]:
    """Read a YAML (or JSON) spec; errors name the file, the section, the column and the field."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot open ({exc})") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("sections"), list):
        raise SpecError(f"{path}: expected a mapping with a 'sections' list")
    known = {f.name for f in fields(Column)}
    sections = []
    for i, raw in enumerate(data["sections"], start=1):
        where = f"{path}: section {i}"
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: expected a mapping")
        for key in ("key", "title", "columns"):
            if key not in raw:
                raise SpecError(f"{where}: missing field {key!r}")
        where = f"{path}: section {raw['key']!r}"
        if not isinstance(raw["columns"], list) or not raw["columns"]:
            raise SpecError(f"{where}: 'columns' must be a non-empty list")
        columns = []
        for j, col in enumerate(raw["columns"], start=1):
            cwhere = f"{where}, column {j}"
            if not isinstance(col, dict):
                raise SpecError(f"{cwhere}: expected a mapping")
            unknown = set(col) - known
            if unknown:
                raise SpecError(f"{cwhere}: unknown field(s) {', '.join(sorted(unknown))}")
            for key in ("header", "tasks", "metric"):
                if key not in col:
                    raise SpecError(f"{cwhere}: missing field {key!r}")
            columns.append(_column(col, cwhere))
        sections.append(Section(str(raw["key"]), str(raw["title"]), tuple(columns)))
    keys = [s.key for s in sections]
    if len(set(keys)) != len(keys):
        raise SpecError(f"{path}: section keys must be unique (got {keys})")
    return tuple(sections)


def _column(col: dict[str, Any], where: str) -> Column:
    tasks = col["tasks"]
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise SpecError(f"{where}: field 'tasks' must be a task name or a list of them")
    role = col.get("role") or ""
    if role not in ROLES:
        raise SpecError(f"{where}: field 'role' is {role!r}; expected one of {ROLES}")
    try:
        return Column(
            header=str(col["header"]),
            tasks=tuple(tasks),
            metric=str(col["metric"]),
            role=role,
            higher_is_better=bool(col.get("higher_is_better", False)),
            scale=float(col.get("scale", 100.0)),
            digits=int(col.get("digits", 1)),
            filter=str(col.get("filter", "none")),
        )
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from exc
