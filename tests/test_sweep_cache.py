"""The sweep's step cache on its own: when a step's folder counts as finished work.

No model, no subprocess: a fake step that writes one file, marked started and finished the way
the sweep does it. The pinned digests are what existing sweep folders hold on disk, so a change
that breaks them (and redoes every finished step of every sweep) fails here first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rejalign_train.sweep.cache import (
    STEP_FORMAT,
    STEP_MARKER,
    STEP_STARTED,
    StepCache,
    argv_key,
    digest,
    file_key,
)

INPUTS = {"fraction": 0.1, "total": 8, "mix_args": ["--seed", "1"]}


def _run_step(cache: StepCache, inputs: dict, text: str = "result") -> dict:
    """What the pipeline does for a step that runs: clear, mark started, write, mark finished."""
    cache.clear()
    started = cache.mark_started(inputs)
    out = cache.folder / "out.txt"
    out.write_text(text, encoding="utf-8")
    outputs = cache.output_digests([out])
    return cache.mark_finished(
        "frac-0.10/mix", inputs, outputs, started=started, seconds=0.5, resumed=False
    )


def test_a_finished_step_is_skipped(tmp_path):
    cache = StepCache(tmp_path / "step")
    assert cache.status(INPUTS) == (None, "not run yet")
    marker = _run_step(cache, INPUTS)
    assert cache.status(INPUTS) == (marker, "finished")
    # The same inputs built anew (another run, keys in another order) are the same step.
    assert StepCache(tmp_path / "step").status(dict(reversed(INPUTS.items())))[1] == "finished"
    assert not cache.started_with(INPUTS)  # finished work is never "resumed"


def test_the_marker_records_inputs_and_outputs(tmp_path):
    cache = StepCache(tmp_path / "step")
    marker = _run_step(cache, INPUTS)
    on_disk = json.loads((cache.folder / STEP_MARKER).read_text(encoding="utf-8"))
    assert on_disk == marker
    assert list(on_disk) == [
        "format",
        "step",
        "key",
        "inputs",
        "outputs",
        "outputs_digest",
        "started",
        "finished",
        "seconds",
        "resumed",
        "versions",
    ]
    assert on_disk["format"] == STEP_FORMAT == "rejalign-sweep-step/1"
    assert on_disk["key"] == digest(INPUTS) and on_disk["inputs"] == INPUTS
    assert on_disk["outputs"] == cache.output_digests([cache.folder / "out.txt"])
    assert on_disk["outputs_digest"] == digest(on_disk["outputs"])
    assert on_disk["seconds"] == 0.5 and on_disk["resumed"] is False
    assert "python" in on_disk["versions"]
    started = json.loads((cache.folder / STEP_STARTED).read_text(encoding="utf-8"))
    assert started == {"key": digest(INPUTS), "started": on_disk["started"]}


@pytest.mark.parametrize(
    "changed, names",
    [
        ({**INPUTS, "total": 9}, "total"),
        ({**INPUTS, "mix_args": ["--seed", "2"]}, "mix_args"),
        ({**INPUTS, "image_root": "/x"}, "image_root"),  # a new input
        ({k: v for k, v in INPUTS.items() if k != "total"}, "total"),  # one gone
        ({**INPUTS, "fraction": 0.2, "total": 9}, "fraction, total"),
    ],
)
def test_changed_inputs_redo_the_step(tmp_path, changed, names):
    cache = StepCache(tmp_path / "step")
    _run_step(cache, INPUTS)
    assert cache.status(changed) == (None, f"inputs changed ({names})")


def test_a_marker_of_another_key_with_the_same_inputs_is_a_format_change(tmp_path):
    cache = StepCache(tmp_path / "step")
    marker = _run_step(cache, INPUTS)
    (cache.folder / STEP_MARKER).write_text(json.dumps({**marker, "key": "0" * 64}))
    assert cache.status(INPUTS) == (None, "inputs changed (format)")


def test_an_output_changed_or_removed_after_marking_redoes_the_step(tmp_path):
    cache = StepCache(tmp_path / "step")
    _run_step(cache, INPUTS)
    out = cache.folder / "out.txt"
    reason = "output out.txt changed or missing since the step finished"
    out.write_text("edited", encoding="utf-8")
    assert cache.status(INPUTS) == (None, reason)
    out.write_text("result", encoding="utf-8")  # the same content again: finished again
    assert cache.status(INPUTS)[1] == "finished"
    out.unlink()
    assert cache.status(INPUTS) == (None, reason)
    out.mkdir()  # a folder where the file was is no output
    assert cache.status(INPUTS) == (None, reason)


def test_outputs_in_subfolders_are_recorded_by_relative_path(tmp_path):
    cache = StepCache(tmp_path / "step")
    cache.mark_started(INPUTS)
    nested = cache.folder / "results" / "model" / "results_1.json"
    nested.parent.mkdir(parents=True)
    nested.write_text("{}", encoding="utf-8")
    other = cache.folder / "a.txt"
    other.write_text("a", encoding="utf-8")
    outputs = cache.output_digests([nested, other])
    assert list(outputs) == ["a.txt", "results/model/results_1.json"]  # sorted, relative
    cache.mark_finished("s", INPUTS, outputs, started="t", seconds=0.0, resumed=False)
    assert cache.status(INPUTS)[1] == "finished"
    nested.write_text('{"x": 1}', encoding="utf-8")
    assert cache.status(INPUTS)[1] == (
        "output results/model/results_1.json changed or missing since the step finished"
    )


def test_only_the_started_marker_is_an_unfinished_step(tmp_path):
    cache = StepCache(tmp_path / "step")
    cache.mark_started(INPUTS)
    (cache.folder / "out.txt").write_text("half", encoding="utf-8")
    assert (cache.folder / STEP_STARTED).is_file()
    assert not (cache.folder / STEP_MARKER).exists()
    assert cache.status(INPUTS) == (None, f"unfinished (no {STEP_MARKER})")
    # It says which inputs the work began with: only those may resume it.
    assert cache.started_with(INPUTS)
    assert not cache.started_with({**INPUTS, "total": 9})
    assert not StepCache(tmp_path / "never").started_with(INPUTS)
    # Clearing it leaves nothing behind for the redo.
    cache.clear()
    assert not cache.folder.exists()
    assert cache.status(INPUTS) == (None, "not run yet")


@pytest.mark.parametrize(
    "text",
    ["{", "[1, 2]", json.dumps({"format": "rejalign-sweep-step/0", "key": digest(INPUTS)})],
)
def test_an_unreadable_or_foreign_marker_is_not_finished(tmp_path, text):
    cache = StepCache(tmp_path / "step")
    _run_step(cache, INPUTS)
    (cache.folder / STEP_MARKER).write_text(text, encoding="utf-8")
    assert cache.read_marker() is None
    assert cache.status(INPUTS) == (None, f"unreadable {STEP_MARKER}")


def _fail_midway(monkeypatch) -> None:
    """Every text write from now on stops halfway through, as a full disk or a kill would."""
    real = Path.write_text

    def half_then_fail(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)


def test_a_failure_mid_write_leaves_no_partial_marker(tmp_path, monkeypatch):
    cache = StepCache(tmp_path / "step")
    started = cache.mark_started(INPUTS)
    out = cache.folder / "out.txt"
    out.write_text("result", encoding="utf-8")
    outputs = cache.output_digests([out])
    _fail_midway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        cache.mark_finished("s", INPUTS, outputs, started=started, seconds=1.0, resumed=False)
    monkeypatch.undo()
    assert not (cache.folder / STEP_MARKER).exists()
    assert sorted(p.name for p in cache.folder.iterdir()) == sorted([STEP_STARTED, "out.txt"])
    assert cache.status(INPUTS) == (None, f"unfinished (no {STEP_MARKER})")


def test_a_failure_mid_rewrite_keeps_the_previous_marker_whole(tmp_path, monkeypatch):
    cache = StepCache(tmp_path / "step")
    marker = _run_step(cache, INPUTS)
    before = (cache.folder / STEP_MARKER).read_bytes()
    _fail_midway(monkeypatch)
    with pytest.raises(OSError):
        cache.mark_finished("s", INPUTS, marker["outputs"], started="t", seconds=2.0, resumed=True)
    monkeypatch.undo()
    assert (cache.folder / STEP_MARKER).read_bytes() == before
    assert not [p for p in cache.folder.iterdir() if p.name.endswith(".tmp")]
    assert cache.status(INPUTS) == (marker, "finished")


def test_digests_are_stable(tmp_path):
    # The canonical JSON: sorted keys, no spaces, non-JSON values as str(). Pinned, because
    # every finished step of every existing sweep folder is keyed by it.
    assert digest({"b": "x", "a": 1}) == digest({"a": 1, "b": "x"})
    assert digest({"a": 1, "b": "x"}) == (
        "ecf9e98ec0641e23113ff3ce8bdc78d0ddd249886517fd4a7f68cc83d4e65667"
    )
    assert digest({"p": Path("/x")}) == digest({"p": "/x"})
    assert digest([1, 2]) != digest([2, 1])  # lists keep their order
    assert digest({"a": None}) != digest({})
    # A value naming a file counts by its content, so an edited file is a changed input.
    data = tmp_path / "fit.yaml"
    data.write_text("lora_r: 8\n", encoding="utf-8")
    key = file_key(str(data))
    assert key == {
        "file": str(data),
        "sha256": "53ba21f2ec08d0fd70b816dbd85335592f919df800a0cc1b84ef2475ae7594b7",
    }
    assert argv_key(["--config", str(data), "--seed", "1"]) == ["--config", key, "--seed", "1"]
    assert file_key("not-a-file") == "not-a-file"
    data.write_text("lora_r: 16\n", encoding="utf-8")
    assert file_key(str(data)) != key
