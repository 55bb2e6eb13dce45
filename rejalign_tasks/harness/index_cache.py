"""Cache lm-eval's task index between runs, so a warm ``lm_eval --tasks ...`` starts in seconds.

Every ``TaskManager()`` in lm-eval 0.4.13 parses all of its ~14,000 bundled task YAML files to
build a name index (about 10 s on one core, ~95% of a warm ``rejalign_figstep`` load; see
benchmarks/render.py). The index of a folder depends only on the files in it, so it is cached per
folder, keyed by lm-eval's version and a signature of every file below the folder (path, mtime,
size: ~0.3 s to compute for lm-eval's own tasks). Any edited, added or removed file changes the
signature and the folder is parsed again, exactly as lm-eval would. Set
``REJALIGN_NO_INDEX_CACHE=1`` to turn the cache off; it is also off with ``REJALIGN_NO_AUTOLOAD``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_ENV_OFF = "REJALIGN_NO_INDEX_CACHE"
_FORMAT = 1


def folder_signature(root: Path) -> str:
    """A digest of every file below ``root``: relative path, mtime (ns) and size."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, root)
            digest.update(f"{rel}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return digest.hexdigest()


def _cache_file(root: Path, version: str) -> Path:
    from rejalign_tasks.contracts import cache_root

    key = hashlib.sha256(f"{_FORMAT}\0{version}\0{root}".encode()).hexdigest()[:24]
    return cache_root() / "lm_eval_index" / f"{key}.pkl"


def _load(path: Path, signature: str):
    try:
        with open(path, "rb") as fh:
            stored_signature, index = pickle.load(fh)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, ValueError):
        return None
    return index if stored_signature == signature else None


def _store(path: Path, signature: str, index) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            pickle.dump((signature, index), tmp, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp.name, path)
    except (OSError, pickle.PicklingError) as exc:  # an unwritable cache only costs time
        log.debug("task index cache not written (%s)", exc)


def cached_build(original_build, version: str, cacheable=None):
    """Wrap ``TaskIndex.build`` to build (or load) each folder's index separately, then merge
    them in order exactly as lm-eval does: later folders override earlier ones, with a warning.

    Only folders for which ``cacheable(root)`` holds are cached: by default lm-eval's own task
    folder, which is self-contained (its ``include:`` files lie inside it, so the signature covers
    them) and is where the time goes. A user's ``--include_path`` may include templates from
    outside itself, and is small, so it is always parsed afresh.
    """
    if cacheable is None:

        def cacheable(root: Path) -> bool:
            import lm_eval.tasks  # imported by the time an index is built

            return root.resolve() == Path(lm_eval.tasks.__file__).resolve().parent

    def build(paths, *, resolve_includes=True):
        if os.environ.get(_ENV_OFF) or not resolve_includes:
            return original_build(paths, resolve_includes=resolve_includes)
        index: dict = {}
        for root in paths:
            root = Path(root)
            path_index = None
            if root.is_dir() and cacheable(root):
                signature = folder_signature(root)
                cache = _cache_file(root.resolve(), version)
                path_index = _load(cache, signature)
                if path_index is None:
                    path_index = original_build([root], resolve_includes=True)
                    _store(cache, signature, path_index)
            else:
                path_index = original_build([root], resolve_includes=True)
            for name, entry in path_index.items():
                if name in index:
                    log.warning(
                        "Task '%s' from %s overrides existing task from %s",
                        name,
                        getattr(entry, "yaml_path", "?"),
                        getattr(index[name], "yaml_path", "?"),
                    )
                index[name] = entry
        return index

    build._rejalign_cached = True  # type: ignore[attr-defined]
    build.__wrapped__ = original_build  # type: ignore[attr-defined]
    return build


def check(module) -> str | None:
    """``TaskIndex.build`` must still be a static method taking ``paths`` and the keyword
    ``resolve_includes``, returning a mapping of names to entries (what the merge relies on)."""
    import inspect

    from rejalign_tasks.harness.fixes import signature_reason

    cls = getattr(module, "TaskIndex", None)
    if not inspect.isclass(cls):
        return f"{module.__name__}.TaskIndex is not a class any more"
    raw = inspect.getattr_static(cls, "build", None)
    if not isinstance(raw, staticmethod):
        return "TaskIndex.build is no longer a static method"
    return signature_reason(raw.__func__, "TaskIndex.build", ("paths", "resolve_includes"))


def patch(module) -> None:
    """Install the cache on ``lm_eval.tasks._index.TaskIndex``."""
    from importlib.metadata import version

    cls = module.TaskIndex
    original = cls.build
    if getattr(original, "_rejalign_cached", False):
        return
    cls.build = staticmethod(cached_build(original, version("lm_eval")))
