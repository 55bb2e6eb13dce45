"""Run text-only and image tasks in one lm-eval run, answered by one VLM (+ adapter).

lm-eval 0.4.13 collects the requests of every task of a run into one list per request type and
hands it to the model at once. Its VLM backends (``hf-multimodal``, ``vllm-vlm``) choose the text
or the text+image code path from the *first* request only, so a run that mixes XSTest (text) with
FigStep (images) crashes (``not enough values to unpack (expected 3, got 2)``).

:func:`routed` mends this in our layer without touching the backend: it derives a subclass whose
request methods split the list by modality, send each part through the backend's own code path
for it (the same path lm-eval takes when a run holds only that kind of task), and put the answers
back in the original order. The model object, its adapter, the chat template and the
generation settings are the ones of the image tasks: one model loaded once answers everything.
The answers are exactly those of separate text-only and image-only runs.

:func:`install` makes lm-eval build the routed subclass whenever a multimodal backend is asked
for by name (``simple_evaluate(model="hf-multimodal", ...)``, the ``lm_eval`` CLI in-process);
``rejalign-eval`` calls it. The backend name in the results stays the one the user gave, so the
results read like any lm-eval run of that backend.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

_REQUEST_METHODS = ("generate_until", "loglikelihood", "loglikelihood_rolling")


def has_images(instance: Any) -> bool:
    """A request carries images when its third argument holds a non-empty ``visual`` list."""
    args = instance.args
    return len(args) >= 3 and isinstance(args[2], dict) and bool(args[2].get("visual"))


def _text_only(instance: Any) -> Any:
    """The request without its (empty) multimodal argument, as a text task would have sent it."""
    if len(instance.args) < 3:
        return instance
    return dataclasses.replace(instance, arguments=tuple(instance.args[:2]))


def route(method: Callable[..., list], requests: Sequence[Any], **kwargs: Any) -> list:
    """Call ``method`` once on the image requests and once on the text-only ones; merge.

    A list of one kind only goes to ``method`` unchanged (text-only requests lose an empty
    ``visual`` argument first), so runs without mixing behave exactly as before.
    """
    image_idx = [i for i, r in enumerate(requests) if has_images(r)]
    text_idx = [i for i, r in enumerate(requests) if not has_images(r)]
    if not text_idx:
        return method(list(requests), **kwargs)
    texts = [_text_only(requests[i]) for i in text_idx]
    if not image_idx:
        return method(texts, **kwargs)
    merged: list = [None] * len(requests)
    for indices, part in ((image_idx, [requests[i] for i in image_idx]), (text_idx, texts)):
        answers = method(part, **kwargs)
        if len(answers) != len(part):
            raise RuntimeError(
                f"{getattr(method, '__qualname__', method)} returned {len(answers)} answers "
                f"for {len(part)} requests"
            )
        for i, answer in zip(indices, answers, strict=True):
            merged[i] = answer
    return merged


class ModalityRouting:
    """Mixin placed before a multimodal lm-eval backend: routes each request list by modality."""

    ROUTES_MODALITIES = True

    def generate_until(self, requests, disable_tqdm: bool = False):
        return route(super().generate_until, requests, disable_tqdm=disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return route(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return route(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)


@functools.cache
def routed(backend: type) -> type:
    """The routing subclass of a multimodal backend class (cached, so built once per class)."""
    if getattr(backend, "ROUTES_MODALITIES", False):
        return backend
    missing = [m for m in _REQUEST_METHODS if not callable(getattr(backend, m, None))]
    if missing:
        raise TypeError(f"{backend.__qualname__} lacks request method(s) {', '.join(missing)}")
    return type(
        f"Routed{backend.__name__}",
        (ModalityRouting, backend),
        {
            "__module__": __name__,
            "__doc__": f"{backend.__qualname__} answering text-only and image requests in one "
            "run (see rejalign_tasks.harness.routing).",
        },
    )


def check(module) -> str | None:
    from rejalign_tasks.harness.fixes import signature_reason

    get_model = getattr(module, "get_model", None)
    if not callable(get_model):
        return f"{module.__name__}.get_model is gone"
    return signature_reason(get_model, "get_model", ("model_name",))


def patch(module) -> None:
    """Make lm-eval's model lookup return the routed subclass for multimodal backends.

    Wraps ``lm_eval.api.registry.get_model`` (which ``simple_evaluate`` calls by module
    attribute), so a backend is routed only once it is chosen and nothing extra is imported.
    Idempotent.
    """
    current = module.get_model
    if getattr(current, "_rejalign_routing", False):
        return

    @functools.wraps(current)
    def get_model(model_name: str):
        cls = current(model_name)
        if getattr(cls, "MULTIMODAL", False):
            logger.info(
                "rejalign: %s answers text-only and image requests of this run by modality",
                model_name,
            )
            return routed(cls)
        return cls

    get_model._rejalign_routing = True  # type: ignore[attr-defined]
    get_model.__wrapped__ = current  # type: ignore[attr-defined]
    module.get_model = get_model


def install() -> bool:
    """Apply the ``modality-routing`` fix (guarded, see :mod:`.fixes`); ``True`` when on."""
    from rejalign_tasks.harness.fixes import apply_on_demand

    return apply_on_demand("modality-routing")


def uninstall() -> None:
    """Undo :func:`install` (used by tests)."""
    import lm_eval.api.registry as registry

    from rejalign_tasks.harness import fixes

    while getattr(registry.get_model, "_rejalign_routing", False):
        registry.get_model = registry.get_model.__wrapped__
    fixes._STATUS.pop("modality-routing", None)
