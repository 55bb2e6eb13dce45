"""The architecture's rules, checked: module size, the dependency direction, one room for host
internals, and an import-light start-up path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rejalign_tasks", "rejalign_train")
MAX_LINES = 600
# Private lm-eval / vLLM modules only the integration room may import.
HOST_PREFIXES = ("lm_eval._", "lm_eval.tasks", "lm_eval.models", "lm_eval.config", "vllm")
# Rooms that use vLLM as a library of their own, not as lm-eval's host: only its public API
# (vllm.LLM, SamplingParams, LoRARequest), and only there.
VLLM_LIBRARY_USERS = {
    "rejalign_tasks/judge/engines.py": {"vllm", "vllm.lora.request"},  # the judges' vLLM engine
}


def _modules():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_module_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_dependency_runs_train_to_tasks_only():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "rejalign_tasks").rglob("*.py")
                 if any(n.split(".")[0] == "rejalign_train" for n in _imports(p))]
    assert not offenders, offenders


def test_only_the_harness_touches_host_internals():
    harness = ROOT / "rejalign_tasks" / "harness"
    offenders = {}
    for path in _modules():
        if harness in path.parents:
            continue
        allowed = VLLM_LIBRARY_USERS.get(path.relative_to(ROOT).as_posix(), set())
        hits = sorted(n for n in _imports(path) if n.startswith(HOST_PREFIXES) and n not in allowed)
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert not offenders, offenders


def test_start_up_path_is_import_light():
    """What rejalign.pth imports at every interpreter start pulls in no third-party module."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import rejalign_tasks.harness.autoload\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new - set(sys.stdlib_module_names) - {'rejalign_tasks'}))\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, "
                           f"{str(ROOT)!r})\n" + code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
