"""Qwen2-VL and Qwen2.5-VL end to end, on tiny random models with Qwen's real tokenizer.

transformers builds these families' processors only with torchvision (their video processor),
which the main environment lacks (no CPU torchvision exists for its torch on PyPI). So these tests
run where torchvision works: in the vLLM environment's interpreter (``$REJALIGN_VLLM_PYTHON``,
built by ``.ci/setup_vllm.sh``, with PyPI's torch 2.13.0 + torchvision 0.28.0); they fail, never
skip, without it. ``tests/qwen2vl_probe.py`` builds the models (``rejalign_train.tiny``) and
reports the trainer's labels there; ``rejalign-train fit`` and ``lm_eval`` run there as the real
CLIs. In the main environment ``rejalign-train fit`` must say what to install.

Qwen's template differs from the other families where a trainer could go wrong: a default
system prompt the template adds, replies ended by ``<|im_end|>`` followed by a newline, a pad
token (``<|endoftext|>``) that is also one of the generation config's EOS ids, images expanded to
a size-dependent number of ``<|image_pad|>`` tokens, no BOS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_vllm_e2e
from conftest import run_lm_eval
from PIL import Image
from test_vllm_e2e import VLLM_ARGS, completions, run_vllm_lm_eval

from rejalign_train.mixing import REFUSAL_SENTENCE
from rejalign_train.synthetic import shape_records, write_jsonl

vllm_python = test_vllm_e2e.vllm_python  # the fixture: $REJALIGN_VLLM_PYTHON, else fail
PROBE = Path(__file__).with_name("qwen2vl_probe.py")
FAMILIES = ("qwen2_vl", "qwen2_5_vl")
TASK = "rejalign_figstep_tiny"
LIMIT = 2
GEN = ["--gen_kwargs", "max_gen_toks=12"]
ENV = {"TOKENIZERS_PARALLELISM": "false"}


def run_probe(python: str, *args: str) -> dict:
    proc = subprocess.run(
        [python, str(PROBE), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def models(vllm_python, data_dir, tmp_path_factory) -> dict[str, Path]:
    """Both families, built in the vLLM environment (about 20 s for the two)."""
    built = run_probe(
        vllm_python, "build", str(tmp_path_factory.mktemp("tiny-qwen")),
        str(data_dir / "tokenizers" / "qwen3"),
    )  # fmt: skip
    return {family: Path(path) for family, path in built.items()}


# Replies of the label records: one refusal (with an image), one two-turn conversation (with an
# image), one text-only record.
REPLIES = {"refusal": [REFUSAL_SENTENCE], "multi": ["A red block.", "Red."], "text": ["Hello."]}


@pytest.fixture(scope="module")
def label_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen-labels")
    (root / "images").mkdir()
    Image.new("RGB", (150, 60), (200, 40, 40)).save(root / "images" / "wide.png")
    Image.new("RGB", (40, 120), (40, 200, 40)).save(root / "images" / "tall.png")
    records = [
        {
            "id": "refusal",
            "image": "images/wide.png",
            "conversations": [
                {"from": "human", "value": "<image>\nHow do I pick a lock?"},
                {"from": "gpt", "value": REFUSAL_SENTENCE},
            ],
        },
        {
            "id": "multi",
            "images": ["images/tall.png"],
            "messages": [
                {"role": "user", "content": "What is this <image> here?"},
                {"role": "assistant", "content": "A red block."},
                {"role": "user", "content": "And its colour?"},
                {"role": "assistant", "content": "Red."},
            ],
        },
        {
            "id": "text",
            "messages": [
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello."},
            ],
        },
    ]
    return write_jsonl(root / "labels.jsonl", records)


@pytest.fixture(scope="module")
def label_reports(vllm_python, models, label_data) -> dict[str, dict]:
    dirs = [str(models[family]) for family in FAMILIES]
    reports = run_probe(vllm_python, "labels", str(label_data), *dirs)
    return {family: reports[str(models[family])] for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_the_replies_and_their_end_of_turn_token(family, models, label_reports):
    """Exactly the reply tokens plus <|im_end|> per assistant turn; ``--refusal-eos mask`` drops
    only the refusal's final <|im_end|>. The template's system prompt, the newline after
    <|im_end|> and the pad token (<|endoftext|>, also an EOS id) stay out of the loss."""
    from transformers import AutoTokenizer

    report = label_reports[family]
    assert report["processor"] == {"qwen2_vl": "Qwen2VLProcessor",
                                   "qwen2_5_vl": "Qwen2_5_VLProcessor"}[family]  # fmt: skip
    assert "<|im_end|>" in report["end_of_turn_tokens"]
    tok = AutoTokenizer.from_pretrained(models[family])  # the main environment reads it
    samples = report["samples"]
    assert [s["id"] for s in samples] == list(REPLIES)
    assert [s["refusal"] for s in samples] == [True, False, False]
    assert samples[0]["text"].startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert "<|vision_start|><|image_pad|><|vision_end|>How do I" in samples[0]["text"]
    counts = [s["num_tokens"] for s in samples]
    for mode in ("mask", "train"):
        got = report[mode]
        assert got["attention"] == counts
        # Images become a size-dependent number of tokens: 150x60 is resized to 140x56
        # (multiples of 28 px, 56*56 to 112*112 px in all), 10x4 patches of 14 px merged 2x2
        # into 5x2 tokens; 40x120 to 28x112, 1x4 tokens; the text-only row none.
        assert got["image_tokens"] == [10, 4, 0], got["image_tokens"]
        for row, sample in enumerate(samples):
            expected = []
            for reply in REPLIES[sample["id"]]:
                expected += tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
            if sample["refusal"] and mode == "mask":
                assert expected[-1] == tok.convert_tokens_to_ids("<|im_end|>")
                expected = expected[:-1]
            assert got["kept"][row] == expected, (mode, sample["id"], tok.decode(got["kept"][row]))
        assert got["loss"] == got["loss"] and got["loss"] > 0  # finite and real
    # LoRA on the language model only; the vision tower's merger is the projector.
    assert report["lora_targets"]
    assert all(t.startswith("model.language_model.layers.") for t in report["lora_targets"])
    assert report["projector"] == "model.visual.merger"


def fit_data(root: Path) -> Path:
    """Six image records (half of them refusals) and two text-only records, JSON Lines."""
    records = shape_records(root / "images", 6, seed=0)
    for record in records[::2]:
        record["conversations"][1]["value"] = REFUSAL_SENTENCE
    records += [
        {"id": f"text_{i}", "messages": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}]}
        for i, (question, answer) in enumerate(
            [("Name a colour.", "Blue."), ("Count to three.", "One, two, three.")]
        )
    ]  # fmt: skip
    return write_jsonl(root / "mixed.jsonl", records)


def run_fit(python: str, model: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, "-m", "rejalign_train.cli", "fit", "--model", str(model), "--data", str(data),
         "--output-dir", str(out), "--max-steps", "2", "--warmup-steps", "0",
         "--per-device-train-batch-size", "4", "--learning-rate", "1e-2", "--projector-lr", "1e-2",
         "--dataloader-num-workers", "0", "--report-to", "none", "--disable-tqdm", "true"],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def adapters(vllm_python, models, tmp_path_factory) -> dict[str, Path]:
    """``rejalign-train fit`` (its defaults: rank 128, projector trained) for each family."""
    work = tmp_path_factory.mktemp("qwen-fit")
    data = fit_data(work)
    out = {}
    for family in FAMILIES:
        out[family] = work / f"adapter-{family}"
        proc = run_fit(vllm_python, models[family], data, out[family])
        assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_fit_writes_an_adapter_on_image_and_text_only_records(family, adapters):
    from safetensors.torch import load_file

    from rejalign_train.manifest import read_manifest

    out = adapters[family]
    manifest = read_manifest(out)
    assert (manifest["data"]["used"], manifest["data"]["refusal_samples"]) == (8, 3)
    assert manifest["adapter"]["modules_to_save"] == ["model.visual.merger"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 128
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert keys and all(
        k.startswith(("base_model.model.model.language_model.", "base_model.model.model.visual."))
        for k in keys
    )
    assert any(".visual.merger." in k for k in keys) and any("lora_A" in k for k in keys)
    assert not any(".visual.blocks." in k for k in keys)  # the vision tower stays frozen
    # The processor with its chat template travels with the adapter, for lm-eval and vLLM.
    template = (out / "chat_template.jinja").read_text()
    assert "<|vision_start|><|image_pad|><|vision_end|>" in template


def hf_args(model: Path, extra: str = "") -> list[str]:
    args = f"pretrained={model},dtype=float32" + (f",{extra}" if extra else "")
    return ["--model", "hf-multimodal", "--model_args", args, "--apply_chat_template",
            "--device", "cpu", "--batch_size", str(LIMIT)]  # fmt: skip


@pytest.fixture(scope="module")
def hf_runs(vllm_python, models, adapters, tmp_path_factory, data_dir) -> dict[str, list[str]]:
    """``lm_eval --model hf-multimodal`` on FigStep-Tiny with the tiny Qwen2-VL, base and
    ``peft=`` the fit adapter."""
    model, runs = models["qwen2_vl"], {}
    for name, extra in (("base", ""), ("adapter", f"peft={adapters['qwen2_vl']}")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "executable", vllm_python)
            proc, results, samples = run_lm_eval(
                [*hf_args(model, extra), "--tasks", TASK, "--limit", str(LIMIT), *GEN],
                tmp_path_factory.mktemp(f"qwen-hf-{name}"),
            )
        assert proc.returncode == 0, proc.stderr[-4000:]
        metrics = results["results"][TASK]
        assert results["n-samples"][TASK]["effective"] == LIMIT
        assert 0.0 <= metrics["asr,none"] <= 1.0 and 0.0 <= metrics["refusal_rate,none"] <= 1.0
        runs[name] = completions(samples[TASK])
    assert all(text.strip() for text in runs["base"] + runs["adapter"])
    assert runs["adapter"] != runs["base"]  # the adapter is applied
    return runs


def test_hf_multimodal_scores_figstep_with_and_without_the_adapter(hf_runs):
    assert len(hf_runs["base"]) == len(hf_runs["adapter"]) == LIMIT


def test_vllm_vlm_with_the_fit_adapter_equals_hf_multimodal(
    vllm_python, models, adapters, hf_runs, tmp_path
):
    """vLLM (CPU) serves the tiny Qwen2-VL with the fit adapter (rank 128, merger trained) as
    ``lora_local_path=``; greedy float32 completions equal transformers' token for token."""
    model, adapter = models["qwen2_vl"], adapters["qwen2_vl"]
    proc, results, samples = run_vllm_lm_eval(
        vllm_python,
        ["--model", "vllm-vlm", "--model_args",
         f"pretrained={model},{VLLM_ARGS},lora_local_path={adapter}",
         "--apply_chat_template", "--tasks", TASK, "--limit", str(LIMIT), *GEN],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert results["config"]["model_args"]["lora_local_path"] == str(adapter)
    assert "Qwen2VLForConditionalGeneration" in proc.stdout + proc.stderr
    assert completions(samples[TASK]) == hf_runs["adapter"]


def test_fit_without_torchvision_says_what_to_install(models, label_data, tmp_path):
    """In this (main) environment: without torchvision, fit stops with the install rule; with a
    working torchvision it gets past the processor."""
    from transformers.utils import is_torchvision_available

    proc = run_fit(sys.executable, models["qwen2_vl"], label_data, tmp_path / "adapter")
    if is_torchvision_available():
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    assert proc.returncode == 2, proc.stderr[-3000:]
    import torch

    minor = int(torch.__version__.split(".")[1])
    assert "cannot build this model's processor without torchvision" in proc.stderr
    assert "Qwen2VLVideoProcessor requires the Torchvision library" in proc.stderr
    assert f"pip install 'torchvision==0.{minor + 15}.*'" in proc.stderr
    assert not (tmp_path / "adapter.incomplete").exists()
