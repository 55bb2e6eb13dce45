"""rejalign never breaks its host: lm-eval's own offline test suite has identical outcomes with
rejalign's import hook (``rejalign.pth``) on and with ``REJALIGN_NO_AUTOLOAD=1``.

The suite is the ``tests/`` folder of the sdist of exactly the installed lm-eval version, which
``source .ci/lm_eval_tests.sh`` unpacks (with ``lm_eval/tasks/`` beside it, which some of its
tests read through their rootdir) and names in ``$REJALIGN_LM_EVAL_TESTS``. Both runs use this
interpreter, a scratch working directory and an empty pytest configuration, so nothing of
rejalign's own test setup (conftest, pyproject options) takes part, and run offline. Tests that
fail in both runs for want of network or data are fine: the criterion is identical outcomes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

TESTS_ENV = "REJALIGN_LM_EVAL_TESTS"
AUTOLOAD_OFF = "REJALIGN_NO_AUTOLOAD"
# Set on TaskManager.__init__ by the task-discovery fix (rejalign_tasks/harness/discovery.py).
PATCH_MARK = "_rejalign_patched"

# lm-eval's offline modules that must be there (a release that drops or renames one must be
# looked at); every other tests/test_*.py of the sdist runs as well.
REQUIRED = (
    "test_task_manager.py",
    "test_cli_subcommands.py",
    "test_registry.py",
    "test_utils.py",
    "test_group.py",
    "test_metrics.py",
    "test_filters.py",
    "test_aggregation_pipeline.py",
    "test_misc.py",
    "test_prompt.py",
    "test_evaluator_utils.py",
    "test_samplers.py",
)
MIN_TESTS = 300
RUN_TIMEOUT_S = 1800

# Outer pytest's variables must not steer the inner runs.
_DROP = ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST", "PYTEST_PLUGINS", "PYTEST_XDIST_WORKER")


def _tests_dir() -> Path:
    value = os.environ.get(TESTS_ENV)
    if not value:
        pytest.fail(
            f"{TESTS_ENV} is not set: run `source .ci/lm_eval_tests.sh` first (it unpacks "
            "lm-eval's own test suite from the sdist of the installed version)"
        )
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"{TESTS_ENV}={value} is not a folder: run `source .ci/lm_eval_tests.sh`")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        pytest.fail(f"lm-eval's test suite at {path} lacks {missing}")
    return path


def _env(hook_on: bool, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env.pop(AUTOLOAD_OFF, None)
    if not hook_on:
        env[AUTOLOAD_OFF] = "1"
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # lm-eval's request cache defaults to a folder inside the installed package.
        LM_HARNESS_CACHE_PATH=str(scratch / "lm_harness_cache"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def _hook_active(env: dict[str, str], cwd: Path) -> bool:
    code = (
        "import lm_eval.tasks.manager as m; "
        f"print(getattr(m.TaskManager.__init__, {PATCH_MARK!r}, False))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1] in ("True", "False"), done.stdout + done.stderr[-4000:]
    return lines[-1] == "True"


def _start(tests: Path, modules: list[Path], scratch: Path, env: dict[str, str]):
    scratch.mkdir(parents=True)
    ini = scratch / "pytest.ini"
    ini.write_text("[pytest]\n")
    junit = scratch / "junit.xml"
    cmd = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
        "-c", str(ini), "-o", "addopts=", "-o", "junit_family=xunit1",
        "--rootdir", str(tests.parent), "--confcutdir", str(tests.parent),
        # Some modules need files the sdist lacks: they count as errors, in both runs alike.
        "--continue-on-collection-errors",
        f"--junitxml={junit}", *map(str, modules),
    ]  # fmt: skip
    log = open(scratch / "pytest.log", "w")  # closed in _finish
    proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log, junit


def _finish(proc, log, junit: Path, label: str) -> dict[str, tuple[str, str]]:
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    log.close()
    tail = Path(log.name).read_text(errors="replace")[-6000:]
    # 0: all passed, 1: some tests failed; anything else is pytest itself failing.
    assert rc in (0, 1), f"lm-eval's suite ({label}) ended with {rc}:\n{tail}"
    assert junit.is_file(), f"lm-eval's suite ({label}) wrote no junit XML:\n{tail}"
    return _outcomes(junit)


def _outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, message) from pytest's xunit1 junit XML."""
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        file = case.get("file") or ""
        classname = case.get("classname") or ""
        module = file[: -len(".py")].replace("/", ".") if file.endswith(".py") else ""
        if module and (classname == module or classname.startswith(module + ".")):
            cls = classname[len(module) + 1 :]
            test_id = "::".join(p for p in (Path(file).name, cls, case.get("name", "")) if p)
        elif file:  # a module's collection error or skip: the module is the id
            test_id = Path(file).name
        else:
            test_id = "::".join(p for p in (classname, case.get("name", "")) if p)
        kinds, messages = [], []
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                kinds.append({"failure": "failed"}.get(child.tag, child.tag))
                # The message, and the end of the report (where the error is).
                text = (child.text or "").strip()
                if len(text) > 2000:
                    text = "[...] " + text[-2000:]
                messages.append(f"{child.get('message') or ''}\n{text}".strip())
        outcome = "+".join(sorted(set(kinds))) or "passed"
        if test_id in results:  # the same id twice: keep every outcome seen
            prev, prev_msg = results[test_id]
            outcome = "+".join(sorted(set(prev.split("+")) | set(outcome.split("+"))))
            messages.insert(0, prev_msg)
        results[test_id] = (outcome, "\n".join(m for m in messages if m))
    return results


def test_lm_eval_suite_same_with_and_without_hook(tmp_path):
    tests = _tests_dir()
    modules = sorted(tests.glob("test_*.py"))

    scratch_on, scratch_off = tmp_path / "hook_on", tmp_path / "hook_off"
    env_on, env_off = _env(True, scratch_on), _env(False, scratch_off)
    assert _hook_active(env_on, tmp_path), (
        f"rejalign's hook is not active in this environment (TaskManager.__init__ lacks "
        f"{PATCH_MARK}): is rejalign.pth installed?"
    )
    assert not _hook_active(env_off, tmp_path), f"{AUTOLOAD_OFF}=1 left the hook active"

    # The two runs are independent (own scratch folder, cache and report each): run them at once.
    start = time.monotonic()
    on = _start(tests, modules, scratch_on, env_on)
    off = _start(tests, modules, scratch_off, env_off)
    try:
        with_hook = _finish(*on, "hook on")
        without_hook = _finish(*off, f"{AUTOLOAD_OFF}=1")
    finally:
        for proc, log, _ in (on, off):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    elapsed = time.monotonic() - start

    counts_on = Counter(outcome for outcome, _ in with_hook.values())
    counts_off = Counter(outcome for outcome, _ in without_hook.values())
    print(
        f"lm-eval suite ({len(modules)} modules, {elapsed:.0f} s for both runs): "
        f"hook on {len(with_hook)} tests {dict(counts_on)}; "
        f"hook off {len(without_hook)} tests {dict(counts_off)}"
    )
    assert len(with_hook) > MIN_TESTS and len(without_hook) > MIN_TESTS, (
        f"too few tests collected (hook on {len(with_hook)}, off {len(without_hook)}; "
        f"expected > {MIN_TESTS})"
    )

    differing = sorted(
        test_id
        for test_id in with_hook.keys() | without_hook.keys()
        if with_hook.get(test_id, ("absent", ""))[0] != without_hook.get(test_id, ("absent", ""))[0]
    )
    report = []
    for test_id in differing:
        o_on, m_on = with_hook.get(test_id, ("absent", ""))
        o_off, m_off = without_hook.get(test_id, ("absent", ""))
        report.append(f"{test_id}: hook on {o_on}, hook off {o_off}")
        if m_on:
            report.append("  hook on:\n" + textwrap.indent(m_on, "    "))
        if m_off:
            report.append("  hook off:\n" + textwrap.indent(m_off, "    "))
    assert not differing, (
        f"{len(differing)} of lm-eval's tests differ with rejalign's hook on:\n" + "\n".join(report)
    )
