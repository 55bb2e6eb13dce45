"""Pinned upstream data files: where they come from, how they are cached, how they are checked.

Every benchmark file is identified by a path relative to a data root laid out like this::

    figstep/safebench.csv
    figstep/SafeBench-Tiny.csv
    mmsafetybench/processed_questions/01-Illegal_Activitiy.json
    mmsafetybench/TinyVersion_ID_List.json
    xstest/xstest_prompts.csv

Resolution order for each file:

1. ``$REJALIGN_DATA_DIR/<relpath>`` when the environment variable is set (offline use, CI, a
   mirror). A set variable is authoritative: a missing file there is an error, not a fallback.
2. The download cache (``$HF_DATASETS_CACHE`` or ``$HF_HOME/datasets``, under ``rejalign/``),
   filled once from the pinned upstream commit and checked against the pinned sha256, so later
   runs work offline.
3. The pinned upstream URL (an immutable raw file at a fixed commit), fetched through the
   ``datasets`` download manager and verified before it is cached.

Neither reachable: one ``DataUnavailableError`` that lists what was tried.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rejalign_tasks.contracts import cache_root, sha256_file

DATA_DIR_ENV = "REJALIGN_DATA_DIR"


@dataclass(frozen=True)
class Source:
    """One pinned upstream file."""

    relpath: str  # path under the data root (and under the cache)
    repo: str  # GitHub owner/name
    commit: str
    upstream_path: str  # path inside the upstream repository
    sha256: str
    licence: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.upstream_path}"


FIGSTEP_COMMIT = "0861b17b3d67887c06ee3534ec65b3012f9becb7"
MMSAFETY_COMMIT = "b80eedea3db312c09ded2082813390f68e750ef3"
XSTEST_COMMIT = "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d"

_MMSAFETY_SCENARIOS = {
    "01-Illegal_Activitiy": "e2db149c809c86fc5e6ef285bc17ca45228b19349ebd73125e7408098a273be9",
    "02-HateSpeech": "462672c4ca05d43a5502de61cbee0f5c12b76c9e7164e7b947f0ce8d1971bcb8",
    "03-Malware_Generation": "da4ceec8e02f130cac70ffabc6127f9d2a9d7466cd9f992c5f9c7ecb0a9645ae",
    "04-Physical_Harm": "f58c97aee2e22257b1b813d94ac7147cdb9e3c1b9c93a03eb14e1f3f32ab879e",
    "05-EconomicHarm": "9146c5eebeed31fcb48a1d622edca2e41c8880430c7e5ba715ed74e2f799ffd7",
    "06-Fraud": "869f47fa08e683d3220e7a4ec071482324748346d17462e0060cedec03cdadc0",
    "07-Sex": "23f4080200eca1701ce15295784e2c2291b2a8bb9883fd34ba92933b4297ceb7",
    "08-Political_Lobbying": "a9c64065b449a1a14ad332ff1fb630a55e8cf5b8f99f2269b230a6414cc2526e",
    "09-Privacy_Violence": "836d48648f9bc6ff1bf32291a7b05a2248c64c15bf363e0afcf8566922e5fdcd",
    "10-Legal_Opinion": "7281f218f74090dafe4df0a2b27c5e6f85949727a14e51418eaadda93811ce72",
    "11-Financial_Advice": "3220e4b9c8c9c588dfb61d4805b5dc1be9839089037b3701daea9af4a9ee298f",
    "12-Health_Consultation": "f3163717d2e397494a69a9462bb61f36c6ca1533b8f36d715593f50377df6895",
    "13-Gov_Decision": "83d3188cf488f08b82baedefdf6a7f28927834ea76e4de0217048bd217a9a0c9",
}

SOURCES: dict[str, Source] = {
    s.relpath: s
    for s in [
        Source(
            "figstep/safebench.csv",
            "ThuCCSLab/FigStep",
            FIGSTEP_COMMIT,
            "data/question/safebench.csv",
            "8e47f40b9b490fa2ca1393cdceb6081e9928848646f4b45fdd43726be941b394",
            "MIT",
        ),
        Source(
            "figstep/SafeBench-Tiny.csv",
            "ThuCCSLab/FigStep",
            FIGSTEP_COMMIT,
            "data/question/SafeBench-Tiny.csv",
            "e5f85f7d0323fe2e4afa99f6715ee97c2581d93856af4728a72fdec94338e867",
            "MIT",
        ),
        Source(
            "mmsafetybench/TinyVersion_ID_List.json",
            "isXinLiu/MM-SafetyBench",
            MMSAFETY_COMMIT,
            "TinyVersion_ID_List.json",
            "85cc71384797828556e026753a1dd320d45b98a3cb4855e1753156f2e58fb457",
            "CC BY-NC 4.0",
        ),
        *[
            Source(
                f"mmsafetybench/processed_questions/{name}.json",
                "isXinLiu/MM-SafetyBench",
                MMSAFETY_COMMIT,
                f"data/processed_questions/{name}.json",
                digest,
                "CC BY-NC 4.0",
            )
            for name, digest in _MMSAFETY_SCENARIOS.items()
        ],
        Source(
            "xstest/xstest_prompts.csv",
            "paul-rottger/exaggerated-safety",
            XSTEST_COMMIT,
            "xstest_prompts.csv",
            "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
            "CC BY 4.0",
        ),
    ]
}

MMSAFETY_SCENARIOS: tuple[str, ...] = tuple(_MMSAFETY_SCENARIOS)


class DataUnavailableError(FileNotFoundError):
    """No copy of a benchmark file could be found or fetched."""


class DataFormatError(ValueError):
    """A benchmark file is malformed; the message names the file, record and field."""


def data_file(relpath: str) -> Path:
    """Local path of the pinned benchmark file ``relpath`` (see the module docstring)."""
    source = SOURCES.get(relpath)
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        path = Path(override).expanduser() / relpath
        if path.is_file():
            return path
        raise DataUnavailableError(
            f"{relpath}: not found at {path} ({DATA_DIR_ENV}={override} is set; unset it to "
            f"download from the pinned upstream source" + (f" {source.url}" if source else "") + ")"
        )
    if source is None:
        raise DataUnavailableError(
            f"{relpath}: no pinned upstream source; set {DATA_DIR_ENV} to a folder that holds it"
        )
    cached = cache_root() / source.commit[:12] / relpath
    if cached.is_file():
        return cached
    try:
        downloaded = _download(source.url)
    except Exception as exc:  # network down, offline mode, HTTP error
        raise DataUnavailableError(
            f"{relpath}: not available. Tried: {DATA_DIR_ENV} (unset); the cache at {cached} "
            f"(absent); the pinned upstream {source.url} ({type(exc).__name__}: {exc}). "
            f"Connect once to fill the cache, or set {DATA_DIR_ENV} to a folder holding {relpath}."
        ) from exc
    actual = sha256_file(downloaded)
    if actual != source.sha256:
        raise DataUnavailableError(
            f"{relpath}: {source.url} has sha256 {actual}, expected the pinned {source.sha256}; "
            "refusing to use it"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as tmp:
        shutil.copyfileobj(open(downloaded, "rb"), tmp)
    os.replace(tmp.name, cached)
    return cached


def _download(url: str) -> str:
    from datasets import DownloadManager

    return DownloadManager(dataset_name="rejalign").download(url)


def read_csv_records(path: str | Path, required: Iterable[str]) -> list[dict[str, str]]:
    """Read a CSV file into dicts, checking the header and every row.

    Errors name the file, the row (1-based data row, header excluded) and the field.
    """
    path = Path(path)
    required = list(required)
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot open ({exc})") from exc
    with fh:
        try:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DataFormatError(
                    f"{path}: missing column(s) {', '.join(map(repr, missing))} "
                    f"(header has {', '.join(map(repr, header))})"
                )
            records = []
            for i, row in enumerate(reader, start=1):
                if None in row or any(row.get(c) is None for c in required):
                    raise DataFormatError(
                        f"{path}: row {i} (line {reader.line_num}) has {len(row) - (None in row)}"
                        f" fields where the header has {len(header)}; unreadable row"
                    )
                for c in required:
                    if not row[c].strip():
                        raise DataFormatError(f"{path}: row {i}, column {c!r} is empty")
                records.append(row)
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path}: not UTF-8 text ({exc})") from exc
        except csv.Error as exc:
            raise DataFormatError(f"{path}: unreadable CSV ({exc})") from exc
    if not records:
        raise DataFormatError(f"{path}: no data rows")
    return records


def read_json(path: str | Path):
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot open ({exc})") from exc
