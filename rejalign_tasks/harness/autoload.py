"""The import hook that applies :mod:`.fixes` to lm-eval's modules as they load.

``rejalign.pth`` (installed into site-packages) imports this module at interpreter start-up. It
registers a meta-path finder that costs nothing until one of the modules named in the fix table
is imported; that module is then executed by :func:`.fixes.exec_with_fixes` (its own loader
runs it; each fix is version-gated, checked against its target and turns itself off with one
warning when the target moved). A module already imported when the hook is installed gets its
patches directly. Set ``REJALIGN_NO_AUTOLOAD=1`` to turn it all off.

This module imports only the standard library at start-up: it runs in every Python process.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

ENV_OFF = "REJALIGN_NO_AUTOLOAD"
# The modules the fix table targets (kept here, not imported from .fixes, so start-up stays free).
HOOKED = frozenset(
    {
        "lm_eval.tasks.manager",
        "lm_eval.tasks._index",
        "lm_eval.models.vllm_vlms",
        "lm_eval.models.vllm_causallms",
        "lm_eval.config.evaluate_config",
        "lm_eval.evaluator",
    }
)


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader):
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            from rejalign_tasks.harness.fixes import exec_with_fixes
        except Exception as exc:  # rejalign itself is broken: lm-eval must still load
            print(f"rejalign: fixes unavailable ({exc!r}); lm-eval runs without them",
                  file=sys.stderr)
            self._wrapped.exec_module(module)
            return
        exec_with_fixes(self._wrapped, module)

    def __getattr__(self, name):  # get_source, get_filename, ...: as the original loader
        return getattr(self._wrapped, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in HOOKED:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None and spec.loader is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def installed() -> bool:
    return any(isinstance(f, _Finder) for f in sys.meta_path)


def install() -> None:
    """Install the hook (idempotent); patch hooked modules that are already imported."""
    if os.environ.get(ENV_OFF):
        return
    already = [sys.modules[name] for name in sorted(HOOKED) if name in sys.modules]
    if already:
        from rejalign_tasks.harness.fixes import patch_imported

        for module in already:
            patch_imported(module)
    if not installed():
        sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    """Remove the hook (modules already loaded keep their fixes)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


install()
