"""Pinned data: checksums of the shared copies, the override, offline failure, malformed files."""

from __future__ import annotations

import pytest

from rejalign_tasks.benchmarks import data as data_mod
from rejalign_tasks.benchmarks.data import (
    SOURCES,
    DataFormatError,
    DataUnavailableError,
    data_file,
    read_csv_records,
    sha256_file,
)
from rejalign_tasks.benchmarks.figstep import (
    SAFEBENCH_COLUMNS,
    load_safebench,
    safebench,
    safebench_tiny,
)


def test_local_copies_match_the_pinned_upstream_checksums(data_dir):
    for relpath, source in SOURCES.items():
        path = data_dir / relpath
        assert path.is_file(), relpath
        assert sha256_file(path) == source.sha256, relpath
        assert source.commit in source.url and source.upstream_path in source.url


def test_override_is_authoritative(tmp_path, monkeypatch):
    monkeypatch.setenv(data_mod.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataUnavailableError, match="figstep/safebench.csv.*REJALIGN_DATA_DIR"):
        data_file("figstep/safebench.csv")


def test_offline_without_cache_names_everything_tried(tmp_path, monkeypatch):
    monkeypatch.delenv(data_mod.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailableError) as err:
        data_file("figstep/SafeBench-Tiny.csv")
    message = str(err.value)
    assert "REJALIGN_DATA_DIR (unset)" in message
    assert str(tmp_path / "cache") in message
    assert SOURCES["figstep/SafeBench-Tiny.csv"].url in message


def test_cache_is_used_without_network(tmp_path, monkeypatch, data_dir):
    """A filled cache serves the file offline (what a second run sees)."""
    monkeypatch.delenv(data_mod.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = SOURCES["figstep/SafeBench-Tiny.csv"]
    cached = tmp_path / "rejalign" / source.commit[:12] / source.relpath
    cached.parent.mkdir(parents=True)
    cached.write_bytes((data_dir / source.relpath).read_bytes())
    assert data_file(source.relpath) == cached


def test_full_and_tiny_safebench(data_dir):
    full = safebench()["test"]
    tiny = safebench_tiny()["test"]
    assert len(full) == 500 and len(tiny) == 50
    from collections import Counter

    assert set(Counter(full["topic"]).values()) == {50}
    assert set(Counter(tiny["topic"]).values()) == {5}
    assert full[0]["font_file"].endswith("FreeMonoBold.ttf") and len(full[0]["font_sha256"]) == 64


def test_missing_column_names_file_and_column(tmp_path, data_dir):
    bad = tmp_path / "safebench.csv"
    lines = (data_dir / "figstep/SafeBench-Tiny.csv").read_text().splitlines()
    header = lines[0].split(",")
    drop = header.index("instruction")
    bad.write_text(
        "\n".join(
            ",".join(c for i, c in enumerate(line.split(",")) if i != drop) for line in lines[:3]
        )
    )
    with pytest.raises(DataFormatError, match=rf"{bad}.*missing column.*'instruction'"):
        load_safebench("figstep/safebench.csv", path=str(bad))


def test_unreadable_row_names_file_and_row(tmp_path):
    bad = tmp_path / "s.csv"
    bad.write_text(
        ",".join(SAFEBENCH_COLUMNS)
        + "\nForbidQI,1,1,Illegal Activity,How?,Steps.\nForbidQI,1,2,Illegal Activity\n"
    )
    with pytest.raises(DataFormatError, match=rf"{bad}: row 2 .*unreadable row"):
        read_csv_records(bad, SAFEBENCH_COLUMNS)


def test_empty_field_and_bad_topic_are_named(tmp_path):
    bad = tmp_path / "s.csv"
    bad.write_text(",".join(SAFEBENCH_COLUMNS) + "\nForbidQI,1,1,Illegal Activity,How?,\n")
    with pytest.raises(DataFormatError, match=r"row 1, column 'instruction' is empty"):
        read_csv_records(bad, SAFEBENCH_COLUMNS)
    bad.write_text(",".join(SAFEBENCH_COLUMNS) + "\nForbidQI,11,1,Other,How?,Steps.\n")
    with pytest.raises(ValueError, match=r"row 1, column 'category_id': unknown topic 11"):
        load_safebench("figstep/safebench.csv", path=str(bad))


def test_unknown_prompt_variant_is_rejected():
    with pytest.raises(ValueError, match="prompt_variant='nine_spaces'"):
        load_safebench("figstep/SafeBench-Tiny.csv", prompt_variant="nine_spaces")
