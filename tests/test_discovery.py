"""Task discovery: with no flag after install, lm-eval's native routes, and the built wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rejalign_tasks import task_configs_dir

ROOT = Path(__file__).resolve().parents[1]
OUR_TASKS = {"rejalign_figstep", "rejalign_figstep_tiny", "rejalign_figstep_text"}


def _python(code: str, *, env: dict | None = None, flags: tuple[str, ...] = (), cwd=None):
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


LIST_TASKS = (
    "from lm_eval.tasks import TaskManager\n"
    "import json, sys\n"
    "tm = TaskManager(include_path=sys.argv[1:] or None)\n"
    "print(json.dumps(sorted(t for t in tm.all_tasks if t.startswith('rejalign'))))\n"
)


def test_task_manager_finds_our_tasks_without_include_path(tmp_path):
    proc = _python(LIST_TASKS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert OUR_TASKS <= set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "overrides existing task" not in proc.stderr  # registered once


def test_lm_eval_ls_tasks_lists_ours(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "ls", "tasks"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for task in OUR_TASKS:
        assert f"|{task} " in proc.stdout


def test_native_include_path_route_without_the_hook(tmp_path):
    """With the hook disabled, lm-eval's own --include_path / TaskManager(include_path=...) work."""
    env = {"REJALIGN_NO_AUTOLOAD": "1"}
    code = LIST_TASKS.replace("include_path=sys.argv[1:] or None", "include_path=None")
    proc = _python(code, env=env, cwd=tmp_path)
    assert (
        proc.returncode == 0
        and not set(json.loads(proc.stdout.strip().splitlines()[-1])) & OUR_TASKS
    )
    code = (
        "from lm_eval.tasks import TaskManager\n"
        f"tm = TaskManager(include_path=[{str(task_configs_dir())!r}])\n"
        "import json; print(json.dumps([t for t in tm.all_tasks if t.startswith('rejalign')]))\n"
    )
    proc = _python(code, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert OUR_TASKS <= set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_entry_point_group_is_registered():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="lm_eval.tasks") if e.name == "rejalign"]
    assert Path(ep.load()()) == task_configs_dir()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("rejalign-*.whl")
    return whl


def test_wheel_ships_task_configs_and_hook(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "rejalign.pth" in names
    yamls = {
        n for n in names if n.startswith("rejalign_tasks/task_configs/") and n.endswith(".yaml")
    }
    shipped = {Path(n).stem for n in yamls}
    checkout = {p.stem for p in task_configs_dir().rglob("*.yaml")}
    assert checkout and shipped == checkout
    assert "rejalign_tasks/task_configs/figstep/_figstep_template_yaml" in names


def test_installed_wheel_is_discovered_with_no_flag(wheel, tmp_path):
    """Unpack the wheel into a fresh site dir; its .pth alone makes lm-eval find our tasks."""
    site_dir = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site_dir)
    import lm_eval

    lm_eval_site = str(Path(lm_eval.__file__).resolve().parents[1])
    # -S: skip the current site (and its editable-install .pth); add lm-eval's site-packages
    # without running its .pth files, then process only the wheel's site dir.
    code = (
        "import sys, site\n"
        f"sys.path.append({lm_eval_site!r})\n"
        f"site.addsitedir({str(site_dir)!r})\n"
        "import rejalign_tasks\n"
        f"assert rejalign_tasks.__file__.startswith({str(site_dir)!r}), rejalign_tasks.__file__\n"
        + LIST_TASKS
    )
    proc = _python(code, flags=("-S",), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert OUR_TASKS <= set(json.loads(proc.stdout.strip().splitlines()[-1]))
