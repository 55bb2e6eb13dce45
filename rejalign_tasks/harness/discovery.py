"""Fix ``task-discovery``: ``lm_eval --tasks rejalign_*`` with no extra flag.

lm-eval 0.4.13 has no plugin mechanism: its ``TaskManager`` scans only ``lm_eval/tasks`` and an
explicit ``include_path``. The fix wraps ``TaskManager.__init__`` so that the task folders
registered in the ``lm_eval.tasks`` entry-point group (the group lm-eval is adding upstream;
rejalign registers its own) join ``include_path`` — only when lm-eval's own tasks are included,
as a plugin's tasks would be: ``TaskManager(include_defaults=False, include_path=D)`` sees exactly
``D``. When lm-eval reads that entry-point group itself, the fix steps aside.
"""

from __future__ import annotations

import ast
import inspect
import logging
import sys
import types
from pathlib import Path

from rejalign_tasks.harness.fixes import signature_reason

logger = logging.getLogger(__name__)

GROUP = "lm_eval.tasks"
_MARK = "_rejalign_patched"


def registered_task_dirs() -> list[str]:
    """Task folders registered under the ``lm_eval.tasks`` entry-point group."""
    from importlib.metadata import entry_points

    dirs: list[str] = []
    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
            path = obj() if callable(obj) else obj
            dirs.append(str(path))
        except Exception as exc:  # a broken third-party plugin must not break lm-eval
            print(f"rejalign: ignoring {GROUP} entry point {ep.name!r}: {exc}", file=sys.stderr)
    from rejalign_tasks import task_configs_dir

    own = str(task_configs_dir())
    if own not in dirs:  # a source checkout on sys.path without installed metadata
        dirs.append(own)
    return list(dict.fromkeys(dirs))


def reads_entry_points(package_dir: Path) -> bool:
    """Whether lm-eval's task code calls ``entry_points(group="lm_eval.tasks")`` itself."""
    for path in sorted(package_dir.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name != "entry_points":
                continue
            for kw in node.keywords:
                if kw.arg == "group" and isinstance(kw.value, ast.Constant):
                    if kw.value.value == GROUP:
                        return True
    return False


def needed() -> bool:
    import importlib.util

    # lm_eval.tasks is still being imported when its manager module runs: ask its spec.
    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None or spec.origin is None:
        return True
    if reads_entry_points(Path(spec.origin).parent):
        logger.info("rejalign: lm-eval discovers %s entry points itself; not adding them", GROUP)
        return False
    return True


def check(module: types.ModuleType) -> str | None:
    cls = getattr(module, "TaskManager", None)
    if not inspect.isclass(cls):
        return f"{module.__name__}.TaskManager is not a class any more"
    return signature_reason(
        cls.__init__, "TaskManager.__init__", ("include_path", "include_defaults")
    )


def patch(module: types.ModuleType) -> None:
    """Wrap ``module.TaskManager.__init__`` to add the registered task folders."""
    cls = module.TaskManager
    original = cls.__init__
    if getattr(original, _MARK, False):
        return
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["include_defaults"]:
            include_path = bound.arguments["include_path"]
            if include_path is None:
                paths: list = []
            elif isinstance(include_path, (list, tuple)):
                paths = list(include_path)
            else:
                paths = [include_path]
            extra = registered_task_dirs()
            # Ours first, so a user's include_path can still override a task of ours.
            bound.arguments["include_path"] = [
                p for p in extra if str(p) not in map(str, paths)
            ] + paths
        original(*bound.args, **bound.kwargs)

    setattr(__init__, _MARK, True)
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    __init__.__doc__ = original.__doc__
    __init__.__signature__ = signature  # type: ignore[attr-defined]
    cls.__init__ = __init__


def is_patched(cls: type) -> bool:
    return bool(getattr(cls.__init__, _MARK, False))
