"""The cached lm-eval task index equals lm-eval's own, and any file change invalidates it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rejalign_tasks import task_configs_dir
from rejalign_tasks.harness.index_cache import cached_build, folder_signature


@pytest.fixture
def original_build():
    """lm-eval's own ``TaskIndex.build`` (the hook keeps it as ``__wrapped__``)."""
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build.__wrapped__


def _task_folder(root: Path, name: str, text: str = "hello") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ncustom_dataset: !function x.y\ndoc_to_text: '{text}'\n"
    )
    return root


def _summary(index: dict) -> dict:
    return {k: (e.kind, str(e.yaml_path), e.cfg, sorted(e.tags)) for k, e in index.items()}


def test_hook_is_installed():
    from lm_eval.tasks._index import TaskIndex

    assert getattr(TaskIndex.build, "_rejalign_cached", False)


def test_cached_index_equals_lm_evals_own(original_build, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import lm_eval.tasks

    roots = [Path(lm_eval.tasks.__file__).parent, task_configs_dir()]
    expected = _summary(original_build(roots))
    build = cached_build(original_build, "test", cacheable=lambda root: True)
    cold = build(roots)
    assert list((tmp_path / "cache").rglob("*.pkl"))
    warm = build(roots)
    assert _summary(cold) == expected
    assert _summary(warm) == expected
    assert "rejalign_figstep" in warm and len(warm) > 1000


def test_any_change_invalidates(original_build, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    build = cached_build(original_build, "test", cacheable=lambda root: True)
    folder = _task_folder(tmp_path / "tasks", "my_task")
    assert build([folder])["my_task"].cfg["doc_to_text"] == "hello"
    signature = folder_signature(folder)
    _task_folder(folder, "my_task", text="changed!")
    os.utime(folder / "my_task.yaml", ns=(1, 1))
    assert folder_signature(folder) != signature
    assert build([folder])["my_task"].cfg["doc_to_text"] == "changed!"
    _task_folder(folder, "other_task")
    assert set(build([folder])) == {"my_task", "other_task"}
    (folder / "other_task.yaml").unlink()
    assert set(build([folder])) == {"my_task"}


def test_later_folders_override_earlier_ones(original_build, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    build = cached_build(original_build, "test", cacheable=lambda root: True)
    first = _task_folder(tmp_path / "a", "same", text="first")
    second = _task_folder(tmp_path / "b", "same", text="second")
    for _ in range(2):  # cold, then warm
        assert build([first, second])["same"].cfg["doc_to_text"] == "second"
        assert _summary(build([first, second])) == _summary(original_build([first, second]))


def test_only_lm_evals_own_folder_is_cached_by_default(original_build, tmp_path, monkeypatch):
    """A user's include path may include templates from outside itself: never cached."""
    import lm_eval.tasks

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    build = cached_build(original_build, "test")
    build([_task_folder(tmp_path / "user", "mine")])
    assert not list((tmp_path / "cache").rglob("*.pkl"))
    build([Path(lm_eval.tasks.__file__).parent])
    assert len(list((tmp_path / "cache").rglob("*.pkl"))) == 1


def test_can_be_turned_off(original_build, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REJALIGN_NO_INDEX_CACHE", "1")
    build = cached_build(original_build, "test", cacheable=lambda root: True)
    build([_task_folder(tmp_path / "t", "x")])
    assert not list((tmp_path / "cache").rglob("*.pkl"))
