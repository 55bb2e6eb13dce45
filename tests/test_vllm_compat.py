"""rejalign_tasks.vllm_compat's fixes to lm-eval's vLLM layer, checked without vLLM.

The end-to-end checks through ``lm_eval --model vllm-vlm`` live in test_vllm_e2e.py.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys

import pytest

from rejalign_tasks import vllm_compat
from rejalign_tasks.vllm_compat import (
    AdapterConfigError,
    LazyRay,
    adapter_rank,
    exec_vllm_vlms,
    vllm_max_lora_rank,
)


def _adapter(tmp_path, config) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (tmp_path / "adapter_config.json").write_text(text)
    return str(tmp_path)


def test_adapter_rank_reads_r_and_rank_pattern(tmp_path):
    assert adapter_rank(_adapter(tmp_path / "a", {"r": 128, "lora_alpha": 256})) == 128
    assert adapter_rank(_adapter(tmp_path / "b", {"r": 8, "rank_pattern": {"q_proj": 64}})) == 64


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "adapter_config.json not found"),
        ("{not json", "unreadable"),
        ("[1, 2]", "expected a JSON object"),
        ({"lora_alpha": 16}, "holds None"),
        ({"r": "128"}, "holds '128'"),
        ({"r": 0}, "holds 0"),
        ({"r": 8, "rank_pattern": ["q_proj"]}, "'rank_pattern' must be an object"),
    ],
)
def test_adapter_rank_errors_name_file_and_field(tmp_path, content, message):
    folder = str(tmp_path) if content is None else _adapter(tmp_path, content)
    with pytest.raises(AdapterConfigError, match=message) as info:
        adapter_rank(folder)
    assert str(tmp_path) in str(info.value)


def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 16, 100, 128, 300, 512)] == [
        1, 8, 8, 16, 128, 128, 320, 512
    ]
    with pytest.raises(AdapterConfigError, match="exceeds"):
        vllm_max_lora_rank(1024)


def _module_from(path, name):
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    return loader, importlib.util.module_from_spec(spec)


def test_vllm_vlms_loads_without_ray(tmp_path, monkeypatch):
    """The module-level ``import ray`` is dropped when ray is missing; ray is needed only later."""
    source = tmp_path / "fake_vllm_vlms.py"
    source.write_text("import os\nimport ray\n\ndef dp():\n    return ray.remote\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    loader, module = _module_from(source, "fake_vllm_vlms")
    exec_vllm_vlms(loader, module)
    assert isinstance(module.ray, LazyRay) and module.os is sys.modules["os"]
    with pytest.raises(ModuleNotFoundError, match="pip install ray"):
        module.dp()


def test_vllm_vlms_untouched_when_ray_is_installed_or_import_gone(tmp_path, monkeypatch):
    source = tmp_path / "fake_vllm_vlms2.py"
    source.write_text("import ray\n")
    fake_ray = type(sys)("ray")
    fake_ray.__spec__ = importlib.machinery.ModuleSpec("ray", None)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    loader, module = _module_from(source, "fake_vllm_vlms2")
    exec_vllm_vlms(loader, module)
    assert module.ray is fake_ray
    # Without ray and without a module-level import (fixed upstream): executed as it is.
    monkeypatch.setitem(sys.modules, "ray", None)
    source.write_text("def dp():\n    import ray\n    return ray\n")
    loader, module = _module_from(source, "fake_vllm_vlms3")
    exec_vllm_vlms(loader, module)
    assert not hasattr(module, "ray")


def test_real_vllm_vlms_source_has_the_import_we_drop():
    """Guards the fix against lm-eval changes: its vllm_vlms.py still imports ray at top level."""
    import ast

    spec = importlib.util.find_spec("lm_eval.models.vllm_vlms")
    tree = ast.parse(spec.loader.get_source("lm_eval.models.vllm_vlms"))
    _, dropped = vllm_compat._without_toplevel_ray_import(tree)
    assert dropped


def test_cli_batch_size_defaults_to_auto_for_vllm_only(tmp_path, monkeypatch):
    from lm_eval._cli import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig

    def _cli_config(*argv: str):
        """Parse ``argv`` with lm-eval's real CLI parser and build its EvaluatorConfig."""
        monkeypatch.setattr(sys, "argv", ["lm_eval", "run", *argv])
        return EvaluatorConfig.from_cli(HarnessCLI().parse_args())

    assert getattr(EvaluatorConfig.from_cli.__func__, "_rejalign_patched", False)
    tasks = ["--tasks", "rejalign_figstep_tiny"]
    assert _cli_config("--model", "vllm-vlm", *tasks).batch_size == "auto"
    assert _cli_config("--model", "vllm", *tasks).batch_size == "auto"
    assert _cli_config("--model", "vllm-vlm", *tasks, "--batch_size", "1").batch_size == "1"
    assert _cli_config("--model", "vllm-vlm", *tasks, "-b", "8").batch_size == "8"
    assert _cli_config("--model", "hf-multimodal", *tasks).batch_size == 1
    config = tmp_path / "run.yaml"
    config.write_text("model: vllm-vlm\ntasks: [rejalign_figstep_tiny]\nbatch_size: 4\n")
    assert _cli_config("--config", str(config)).batch_size == 4
    config.write_text("model: vllm-vlm\ntasks: [rejalign_figstep_tiny]\n")
    assert _cli_config("--config", str(config)).batch_size == "auto"
