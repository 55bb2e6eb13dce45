"""From a logged lm-eval sample to what a judge reads: the request, the completion, and for the
vision judges the attack image, rebuilt the way the task built it and checked against its hash.

Which doc field is the request depends on the task family (the behaviour the judge decides
against, in words, never the typographic instruction the attack hid in the image):

* FigStep (``rejalign_figstep*``): SafeBench's ``question``;
* MM-SafetyBench (``rejalign_mmsafety_*``): the scenario's original ``question``;
* XSTest (``rejalign_xstest*``): the ``prompt``.

Utility tasks (ScienceQA-IMG, VizWiz) have nothing harmful to judge and are not judged; nor is
any task outside these families (it is listed as skipped).

Images are rebuilt by the task's own ``doc_to_image`` (named in its YAML file under rejalign's
task folder, the function lm-eval called) from the logged document, then hashed exactly as
lm-eval 0.4.13 logs them (``lm_eval.utils.convert_pil_to_hash``: sha256 of the PNG encoding;
``arguments -> gen_args_0 -> arg_2 -> visual``). A different hash means the judge would see
another image than the model saw: an error naming the samples file and the doc_id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rejalign_tasks.console import UsageError
from rejalign_tasks.contracts import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from PIL import Image

# Task-name prefix -> the doc field holding the request in words.
REQUEST_FIELDS: tuple[tuple[str, str], ...] = (
    ("rejalign_figstep", "question"),
    ("rejalign_mmsafety_", "question"),
    ("rejalign_xstest", "prompt"),
)
UTILITY_TASKS = ("rejalign_scienceqa_img", "rejalign_vizwiz")


class ImageMismatchError(UsageError):
    """The rebuilt attack image differs from the one the task logged."""


def request_field(task: str) -> str | None:
    """The doc field a judge reads as the request, or None for a task that is not judged."""
    for prefix, name in REQUEST_FIELDS:
        if task.startswith(prefix):
            return name
    return None


def skip_reason(task: str) -> str:
    if task in UTILITY_TASKS:
        return "a utility task (no harmful request to judge)"
    return "not a safety task rejalign-judge knows (FigStep, MM-SafetyBench, XSTest)"


def _yaml_loader():
    """A YAML loader that keeps ``!function module.name`` as ``("function", dotted name)``."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[str, str]:
        return "function", loader.construct_scalar(node)

    Loader.add_constructor("!function", function)
    return Loader


@functools.lru_cache(maxsize=1)
def _task_functions() -> dict[str, dict[str, str]]:
    """task name -> {"doc_to_image": dotted name, "doc_to_text": dotted name} from rejalign's
    task YAML files (``include:`` followed)."""
    import yaml

    from rejalign_tasks import task_configs_dir

    loader = _yaml_loader()
    root = task_configs_dir()
    raw: dict[Path, dict] = {}
    for path in sorted(root.rglob("*yaml")):
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        if isinstance(data, dict):
            raw[path] = data

    def resolved(path: Path, data: dict) -> dict:
        base: dict = {}
        include = data.get("include")
        if include:
            inc = path.parent / include
            base = resolved(inc, raw.get(inc, {}))
        return {**base, **data}

    out: dict[str, dict[str, str]] = {}
    for path, data in raw.items():
        full = resolved(path, data)
        task = full.get("task")
        if not isinstance(task, str):
            continue
        out[task] = {
            key: full[key][1]
            for key in ("doc_to_image", "doc_to_text")
            if isinstance(full.get(key), tuple)
        }
    return out


def _function(dotted: str) -> Callable:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def task_function(task: str, key: str) -> Callable | None:
    """The task's own ``doc_to_image``/``doc_to_text`` (None if its YAML has none)."""
    dotted = _task_functions().get(task, {}).get(key)
    return None if dotted is None else _function(dotted)


def png_sha256(image: Image.Image) -> str:
    """lm-eval 0.4.13's logged image hash (``lm_eval.utils.convert_pil_to_hash``)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def logged_visuals(sample: dict) -> list[str]:
    """The image hashes lm-eval logged for a sample's request (empty for a text request)."""
    out: list[str] = []
    args = sample.get("arguments") or {}
    groups = [args[k] for k in sorted(args)] if isinstance(args, dict) else list(args)
    for group in groups:
        values = list(group.values()) if isinstance(group, dict) else list(group)
        for v in values:
            if isinstance(v, dict) and "visual" in v:
                visual = v["visual"]
                out.extend(visual if isinstance(visual, list) else [visual])
    return out


@dataclass(frozen=True)
class SampleView:
    """What the judge needs from one logged sample."""

    doc_id: int
    request: str
    response: str
    prompt_sent: str | None


def completion(sample: dict, where: str) -> str:
    """The completion lm-eval scored: ``filtered_resps[0]``, else ``resps[0][0]``."""
    for key in ("filtered_resps", "resps"):
        value = sample.get(key)
        while isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str):
            return value
    raise UsageError(f"{where}: no completion under 'filtered_resps' or 'resps'")


def sample_view(task: str, sample: dict, where: str) -> SampleView:
    field = request_field(task)
    doc = sample.get("doc")
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: no logged 'doc' (the request is read from it)")
    if field is None or not isinstance(doc.get(field), str):
        raise UsageError(f"{where}: the doc has no text field {field!r} (the request)")
    prompt_sent = None
    to_text = task_function(task, "doc_to_text")
    if to_text is not None and task_function(task, "doc_to_image") is not None:
        prompt_sent = to_text(doc).replace(IMAGE_PLACEHOLDER, "").strip()
    return SampleView(int(sample["doc_id"]), doc[field], completion(sample, where), prompt_sent)


def rebuild_image(task: str, sample: dict, where: str) -> Image.Image | None:
    """The attack image of an image task's sample, checked against the logged hash; None for a
    text task."""
    to_image = task_function(task, "doc_to_image")
    logged = logged_visuals(sample)
    if to_image is None:
        if logged:
            raise UsageError(
                f"{where}: the sample logged an image but task {task!r} has no doc_to_image in "
                "rejalign's task files; cannot rebuild it"
            )
        return None
    images = to_image(sample["doc"])
    images = images if isinstance(images, list) else [images]
    if len(images) != 1:
        raise UsageError(f"{where}: doc_to_image gave {len(images)} images; the judges take one")
    if not logged:
        raise ImageMismatchError(
            f"{where}: no image hash logged (arguments -> visual); the rebuilt image cannot be "
            "checked against the one the model saw"
        )
    rebuilt = png_sha256(images[0])
    if rebuilt != logged[0]:
        raise ImageMismatchError(
            f"{where}: the rebuilt attack image has sha256 {rebuilt}, but the task logged "
            f"{logged[0]}: the judge would see another image than the model did (another font, "
            "renderer or image source than the evaluation's, or another PNG encoder)"
        )
    return images[0]


def has_images(task: str) -> bool:
    return task_function(task, "doc_to_image") is not None
