"""Make ``lm_eval --tasks rejalign_*`` work with no extra flag.

lm-eval 0.4.13 has no plugin mechanism: its ``TaskManager`` scans only ``lm_eval/tasks`` and an
explicit ``include_path``. ``rejalign.pth`` (installed into site-packages) imports this module at
start-up; it registers a meta-path finder that waits, at no cost, until ``lm_eval.tasks.manager``
is imported, then wraps ``TaskManager.__init__`` so that the task folders registered in the
``lm_eval.tasks`` entry-point group (the group lm-eval is adding upstream; rejalign registers its
own) are appended to ``include_path``. When lm-eval gains native entry-point discovery the hook
steps aside. The same finder applies :mod:`.vllm_compat`'s fixes to lm-eval's vLLM
backends as they load. Set ``REJALIGN_NO_AUTOLOAD=1`` to disable it all.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_GROUP = "lm_eval.tasks"
_VLLM_COMPAT = "rejalign_tasks.harness.vllm_compat"

# module -> (function executing it with its original loader, function patching it when it was
# already imported before the hook was installed). Names, so nothing is imported until needed.
_HOOKS: dict[str, tuple[str, str | None]] = {
    "lm_eval.tasks.manager": (f"{__name__}:exec_task_manager", f"{__name__}:patch_task_manager"),
    "lm_eval.tasks._index": (
        "rejalign_tasks.harness.index_cache:exec_index",
        "rejalign_tasks.harness.index_cache:patch_index",
    ),
    "lm_eval.models.vllm_vlms": (f"{_VLLM_COMPAT}:exec_vllm_vlms", None),
    "lm_eval.models.vllm_causallms": (
        f"{_VLLM_COMPAT}:exec_vllm_causallms",
        f"{_VLLM_COMPAT}:patch_vllm_causallms",
    ),
    "lm_eval.config.evaluate_config": (
        f"{_VLLM_COMPAT}:exec_evaluate_config",
        f"{_VLLM_COMPAT}:patch_evaluate_config",
    ),
}


def _resolve(name: str):
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def registered_task_dirs() -> list[str]:
    """Task folders registered under the ``lm_eval.tasks`` entry-point group."""
    from importlib.metadata import entry_points

    dirs: list[str] = []
    for ep in entry_points(group=_GROUP):
        try:
            obj = ep.load()
            path = obj() if callable(obj) else obj
            dirs.append(str(path))
        except Exception as exc:  # a broken third-party plugin must not break lm-eval
            print(
                f"rejalign: ignoring lm_eval.tasks entry point {ep.name!r}: {exc}", file=sys.stderr
            )
    from rejalign_tasks import task_configs_dir

    own = str(task_configs_dir())
    if own not in dirs:  # a source checkout on sys.path without installed metadata
        dirs.append(own)
    return list(dict.fromkeys(dirs))


def patch_task_manager(module) -> None:
    """Wrap ``module.TaskManager.__init__`` to add the registered task folders."""
    cls = module.TaskManager
    if getattr(cls.__init__, "_rejalign_patched", False):
        return
    original = cls.__init__

    def __init__(self, *args, include_path=None, **kwargs):
        extra = registered_task_dirs()
        if include_path is None:
            paths: list = []
        elif isinstance(include_path, (list, tuple)):
            paths = list(include_path)
        else:
            paths = [include_path]
        # Ours first, so a user's --include_path can still override a task of ours.
        merged = [p for p in extra if str(p) not in map(str, paths)] + paths
        original(self, *args, include_path=merged, **kwargs)

    __init__._rejalign_patched = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__


def exec_task_manager(loader, module) -> None:
    loader.exec_module(module)
    patch_task_manager(module)


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, hook: str):
        self._wrapped = wrapped
        self._hook = hook

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        _resolve(self._hook)(self._wrapped, module)

    def __getattr__(self, name):  # get_source, get_filename, ...: as the original loader
        return getattr(self._wrapped, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, _HOOKS[fullname][0])
                return spec
        return None


def install() -> None:
    if os.environ.get("REJALIGN_NO_AUTOLOAD"):
        return
    for name, (_, patch) in _HOOKS.items():
        if name in sys.modules and patch is not None:
            _resolve(patch)(sys.modules[name])
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
