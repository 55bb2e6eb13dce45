"""``--model vllm`` with image tasks: the fix ``vllm-images`` (see the table in :mod:`.fixes`).

lm-eval 0.4.13 refuses a multimodal task for a model class without ``MULTIMODAL``
(``lm_eval.evaluator.evaluate``: "... require multimodal input, but the selected model type does
not currently implement this"), so ``lm_eval --model vllm --tasks rejalign_figstep`` fails,
although the vLLM engine ``--model vllm`` builds for a VLM checkpoint is the very engine
``--model vllm-vlm`` builds (``VLLM_VLM.__init__`` is ``VLLM.__init__`` plus a processor).

The seam is ``evaluate``, the first place where both the model *object* and the loaded tasks are
known (``simple_evaluate`` builds the model from its name before it loads the tasks, and
``evaluate`` is called through the module's namespace). Its wrapper acts only when the model is
an instance of exactly lm-eval's ``VLLM`` and at least one task is multimodal; every other call
goes to lm-eval's ``evaluate`` unchanged, so text-only ``--model vllm`` runs stay lm-eval's own.
When it acts:

* the model object becomes an instance of a subclass of ``VLLM_VLM`` whose ``__init__`` is
  lm-eval's own, except that the ``VLLM.__init__`` it calls adopts the state of the ``VLLM``
  already built: one ``vllm.LLM`` (and its LoRA request) serves everything, and the processor,
  image handling and chat template of the image path are exactly ``vllm-vlm``'s;
* requests are split by modality (:class:`.routing.ModalityRouting`): image requests take
  ``VLLM_VLM``'s text+image path, text requests ``VLLM``'s text path;
* prompts: the image tasks are rendered with ``VLLM_VLM.apply_chat_template`` (the processor's
  template), the text tasks with ``VLLM.apply_chat_template`` (the tokenizer's) — so text tasks
  get the very prompts and completions of a ``--model vllm`` run of them alone.

One INFO line names the image tasks. A model without a multimodal processor gets a clear
error naming it and the image tasks. If ``VLLM_VLM`` or ``Task.build_all_requests`` changed shape
the fix turns itself off with one warning, and lm-eval answers as it ships (its own error for the
image tasks). Set ``REJALIGN_NO_AUTOLOAD=1`` to get lm-eval's own behaviour.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

from rejalign_tasks.harness.fixes import signature_reason

# lm-eval's CLI shows the records of the ``lm_eval`` logger tree only (at its --verbosity): the
# run's one line about this fix goes there, next to lm-eval's own.
logger = logging.getLogger("lm_eval.rejalign.vllm_images")

FIX = "vllm-images"
CAUSAL = "lm_eval.models.vllm_causallms"
VLMS = "lm_eval.models.vllm_vlms"
#: ``VLLM_VLM.__init__`` parameters this fix passes or relies on (defaults used for the rest).
VLM_INIT_PARAMS = ("pretrained", "revision", "trust_remote_code")
#: How the run's one INFO line about this fix begins (the image tasks' names follow).
LINE_MARK = "rejalign: --model vllm runs the image task(s)"


# --------------------------------------------------------------------------- the target: evaluator


def check(module: types.ModuleType) -> str | None:
    """``evaluate`` takes the model and the tasks, and ``simple_evaluate`` calls it by name."""
    evaluate = getattr(module, "evaluate", None)
    if not callable(evaluate):
        return f"{module.__name__}.evaluate is gone"
    reason = signature_reason(evaluate, "evaluate", ("lm", "task_dict"))
    if reason is not None:
        return reason
    simple = getattr(module, "simple_evaluate", None)
    code = getattr(inspect.unwrap(simple), "__code__", None) if callable(simple) else None
    if code is None or "evaluate" not in code.co_names:
        return "simple_evaluate no longer calls the module's evaluate"
    return None


def patch(module: types.ModuleType) -> None:
    """Wrap ``lm_eval.evaluator.evaluate`` (idempotent)."""
    original = module.evaluate
    if getattr(original, "_rejalign_vllm_images", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def evaluate(*args, **kwargs):
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # lm-eval's own error for a bad call
        lm = bound.arguments.get("lm")
        vllm_cls = _plain_vllm_class()
        if vllm_cls is None or type(lm) is not vllm_cls:
            return original(*args, **kwargs)
        tasks = _leaf_tasks(bound.arguments.get("task_dict"))
        image_tasks = {n: t for n, t in tasks.items() if getattr(t, "MULTIMODAL", False)}
        if not image_tasks:
            return original(*args, **kwargs)
        combined = with_images(lm, list(image_tasks))
        if combined is None:  # the fix just turned off: lm-eval answers as it ships
            return original(*args, **kwargs)
        if "lm" in kwargs:
            kwargs["lm"] = combined
        else:
            args = (combined, *args[1:])
        restore = _image_prompts(image_tasks.values(), combined)
        try:
            return original(*args, **kwargs)
        finally:
            restore()

    evaluate._rejalign_vllm_images = True  # type: ignore[attr-defined]
    module.evaluate = evaluate


def _plain_vllm_class() -> type | None:
    """lm-eval's ``VLLM`` when its module is loaded (a ``VLLM`` object implies it is)."""
    module = sys.modules.get(CAUSAL)
    cls = getattr(module, "VLLM", None)
    return cls if isinstance(cls, type) else None


def _leaf_tasks(task_dict: Any) -> dict[str, Any]:
    """The tasks of ``TaskManager.load``'s result (or of the legacy nested dict), by name."""
    if isinstance(task_dict, dict) and isinstance(task_dict.get("tasks"), dict):
        return dict(task_dict["tasks"])
    found: dict[str, Any] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value)
                elif hasattr(value, "build_all_requests"):
                    found[str(getattr(value, "task_name", key))] = value

    walk(task_dict)
    return found


# --------------------------------------------------------------------------- the model


def check_vlm(vlm_cls: Any, vllm_cls: type, task_cls: Any) -> str | None:
    """What this fix relies on in ``VLLM_VLM`` and ``Task`` (checked when first needed: the
    vLLM modules are imported only by vLLM runs)."""
    if not isinstance(vlm_cls, type) or not issubclass(vlm_cls, vllm_cls):
        return f"{VLMS}.VLLM_VLM is not a subclass of VLLM any more"
    if not getattr(vlm_cls, "MULTIMODAL", False):
        return "VLLM_VLM is no longer MULTIMODAL"
    for name in ("__init__", "apply_chat_template", "generate_until"):
        if name not in vars(vlm_cls):
            return f"VLLM_VLM no longer defines {name}"
    reason = signature_reason(vlm_cls.__init__, "VLLM_VLM.__init__", VLM_INIT_PARAMS)
    if reason is not None:
        return reason
    if "apply_chat_template" not in vars(vllm_cls):
        return "VLLM no longer defines apply_chat_template"
    build = getattr(task_cls, "build_all_requests", None)
    if not callable(build):
        return "Task.build_all_requests is gone"
    return signature_reason(build, "Task.build_all_requests", ("chat_template",))


@functools.cache
def _combined_class(vlm_cls: type, vllm_cls: type) -> type:
    """``(ModalityRouting, VLLM_VLM, SharedEngine)``: the MRO puts ``SharedEngine`` between
    ``VLLM_VLM`` and ``VLLM``, so ``VLLM_VLM.__init__``'s ``super().__init__`` adopts the state
    of the ``VLLM`` already built (engine, tokenizer, LoRA request) instead of building another.
    """
    from rejalign_tasks.harness.routing import ModalityRouting

    def __init__(self, *args, **kwargs):
        self.__dict__.update(vars(self._rejalign_engine_of))

    shared = type("SharedEngine", (vllm_cls,), {"__init__": __init__, "__module__": __name__})
    return type(
        "VLLMWithImages",
        (ModalityRouting, vlm_cls, shared),
        {
            "__module__": __name__,
            "__doc__": "lm-eval's VLLM_VLM on the engine of a `--model vllm` object: image "
            "requests through its multimodal path, text requests through VLLM's (see "
            "rejalign_tasks.harness.vllm_images).",
            # Text tasks are prompted as --model vllm prompts them (the image tasks get
            # VLLM_VLM's template through _image_prompts).
            "apply_chat_template": vllm_cls.apply_chat_template,
            "_rejalign_vlm": vlm_cls,
        },
    )


def with_images(lm: Any, image_tasks: list[str]) -> Any | None:
    """The ``VLLM`` object ``lm`` as a ``VLLM_VLM`` on the same engine, or ``None`` when the fix
    is off (one warning). Raises ``ValueError`` when the model has no multimodal processor."""
    from rejalign_tasks.harness import fixes

    fix = fixes.fix_named(FIX)
    try:
        import lm_eval.api.task as task_module

        vlms = __import__(VLMS, fromlist=["VLLM_VLM"])
        vlm_cls, vllm_cls = getattr(vlms, "VLLM_VLM", None), type(lm)
        reason = check_vlm(vlm_cls, vllm_cls, getattr(task_module, "Task", None))
    except Exception as exc:
        reason = f"{VLMS} cannot be used ({exc!r})"
    if reason is not None:
        fixes.turn_off(fix, reason)
        return None
    pretrained = lm.model_args["model"]
    cls = _combined_class(vlm_cls, vllm_cls)
    combined = cls.__new__(cls)
    combined._rejalign_engine_of = lm
    try:
        combined.__init__(
            pretrained=pretrained,
            revision=lm.model_args.get("revision"),
            trust_remote_code=bool(lm.model_args.get("trust_remote_code")),
        )
    except Exception as exc:  # AutoProcessor found nothing it can load
        detail = f"loading it failed: {exc}"
        raise ValueError(_no_processor(pretrained, image_tasks, detail)) from exc
    processor = getattr(combined, "processor", None)
    if getattr(processor, "image_processor", None) is None:
        detail = f"AutoProcessor gives a {type(processor).__name__}"
        raise ValueError(_no_processor(pretrained, image_tasks, detail))
    del combined._rejalign_engine_of
    logger.info(
        "%s %s through lm-eval's vllm-vlm path (processor, images, its chat template) on the "
        "same vLLM engine; text tasks as --model vllm",
        LINE_MARK,
        ", ".join(image_tasks),
    )
    return combined


def _no_processor(pretrained: str, image_tasks: list[str], detail: str) -> str:
    return (
        f"--model vllm: the model {pretrained} has no multimodal processor ({detail}), so it "
        f"cannot run the image task(s) {', '.join(image_tasks)}; give a vision-language model, "
        "or run only text tasks"
    )


def _image_prompts(tasks, combined: Any) -> Callable[[], None]:
    """Make the image tasks render their prompts with ``VLLM_VLM.apply_chat_template`` (for this
    call only: the wrapper is an attribute of these task objects, removed by the returned
    function)."""
    vlm_template = functools.partial(combined._rejalign_vlm.apply_chat_template, combined)
    wrapped = []
    for task in tasks:
        build = task.build_all_requests

        def build_all_requests(*args, _build=build, **kwargs):
            if kwargs.get("chat_template") is not None:
                kwargs["chat_template"] = vlm_template
            return _build(*args, **kwargs)

        task.build_all_requests = build_all_requests
        wrapped.append(task)

    def restore() -> None:
        for task in wrapped:
            vars(task).pop("build_all_requests", None)

    return restore

