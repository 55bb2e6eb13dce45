"""Every advertised family end to end, each on its real tokenizer and chat template.

LLaVA-1.5 (Llama-2's tokenizer as llava-hf extends it, llava-hf's template), LLaVA-NeXT (the same,
and the vicuna template of LLaVA-NeXT's conversions), Gemma 3 (its tokenizer and template) and
Idefics3 (Llama 3's tokenizer with Idefics3's added tokens, Idefics3-8B-Llama3's template), as
tiny random models (``rejalign_train.tiny_families``); Qwen2-VL and Qwen2.5-VL have the same
matrix in ``tests/test_qwen2vl.py``. For each family:

- the trainer's labels on a text-only, a refusal and a multi-turn sample (one batch, the
  text-only row first) are exactly the reply tokens plus the end-of-turn token, and
  ``--refusal-eos mask`` drops only the refusal's final one;
- each sample's token count is exact in context (images right after a newline, after a system
  prompt, two in one turn, none);
- ``rejalign-train fit`` on image and text-only records writes an adapter;
- ``lm_eval --model hf-multimodal`` scores FigStep-Tiny with and without ``peft=``;
- ``lm_eval --model vllm-vlm`` (vLLM 0.32 for CPU, in ``$REJALIGN_VLLM_PYTHON``) with the
  adapter as ``lora_local_path=`` gives the same greedy float32 completions as hf-multimodal.
  vLLM for CPU runs all four families; the one difference is the detokenizer's: vLLM keeps the
  space of a completion's first Llama-2 "▁" word, which transformers drops. Gemma 3's run is the
  slowest (about 100 s on two cores): vLLM loads and deep-copies its 262k-token tokenizer some
  twenty times while it builds its processors.

The families differ where a trainer could go wrong: llava-hf's template ends replies with a
space and no EOS (the trainer appends ``</s>``); the vicuna template has no ``{% generation %}``
marks; Gemma 3 writes its BOS in the template and expands an image into text that merges with
the newlines around it; Idefics3 writes Llama 3's BOS in the template, splits an image into a
size-dependent number of crops and ends turns with ``<end_of_utterance>``; LLaVA-NeXT tiles an
image into a size-dependent number of patches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_vllm_e2e
from conftest import run_lm_eval
from PIL import Image
from test_qwen2vl import fit_data
from test_vllm_e2e import VLLM_ARGS, completions, run_vllm_lm_eval

from rejalign_train.mixing import REFUSAL_SENTENCE
from rejalign_train.synthetic import write_jsonl
from rejalign_train.tiny_families import FAMILIES, LLAVA_VICUNA_TEMPLATE, build_family

vllm_python = test_vllm_e2e.vllm_python  # the fixture: $REJALIGN_VLLM_PYTHON, else fail
TASK = "rejalign_figstep_tiny"
LIMIT = 2
GEN = ["--gen_kwargs", "max_gen_toks=12"]
# The token that ends a reply, and what the tokenizer puts before a reply's first word in
# context (Llama 3's byte-level BPE keeps the space after "Assistant:" with the word; Llama-2's
# SentencePiece starts every word with its own "▁"; Gemma's reply follows a newline).
END_OF_TURN = {"llava15": "</s>", "llava_next": "</s>", "gemma3": "<end_of_turn>",
               "idefics3": "<end_of_utterance>"}  # fmt: skip
LEAD = {"llava15": "", "llava_next": "", "gemma3": "", "idefics3": " "}
ARCHITECTURE = {"llava15": "LlavaForConditionalGeneration",
                "llava_next": "LlavaNextForConditionalGeneration",
                "gemma3": "Gemma3ForConditionalGeneration",
                "idefics3": "Idefics3ForConditionalGeneration"}  # fmt: skip
SENTENCEPIECE = {"llava15", "llava_next"}  # Llama-2's "▁"-prefixed words
PROJECTOR = {"llava15": "model.multi_modal_projector", "llava_next": "model.multi_modal_projector",
             "gemma3": "model.multi_modal_projector", "idefics3": "model.connector"}  # fmt: skip
LANGUAGE_MODEL = {"llava15": "model.language_model.", "llava_next": "model.language_model.",
                  "gemma3": "model.language_model.", "idefics3": "model.text_model."}  # fmt: skip


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family, data_dir, tmp_path_factory) -> Path:
    """The family's tiny model, built once for all of its tests."""
    return build_family(family, tmp_path_factory.mktemp(f"tiny-{family}"), data_dir / "tokenizers")


# Replies of the label records: one text-only record (first, so that a batch starts without an
# image), one refusal (with an image), one two-turn conversation with a system prompt and an
# image in the middle of the text.
REPLIES = {"text": ["Hello."], "refusal": [REFUSAL_SENTENCE], "multi": ["A red block.", "Red."]}


@pytest.fixture(scope="module")
def label_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family-labels")
    (root / "images").mkdir()
    Image.new("RGB", (150, 60), (200, 40, 40)).save(root / "images" / "wide.png")
    Image.new("RGB", (40, 120), (40, 200, 40)).save(root / "images" / "tall.png")
    records = [
        {
            "id": "text",
            "messages": [
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Hello."},
            ],
        },
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
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is this <image> here?"},
                {"role": "assistant", "content": "A red block."},
                {"role": "user", "content": "And its colour?"},
                {"role": "assistant", "content": "Red."},
            ],
        },
    ]
    return write_jsonl(root / "labels.jsonl", records)


def _labels(model_dir: Path, data: Path, family: str, template: str | None = None) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rejalign_train.chat import ChatRenderer
    from rejalign_train.collator import IGNORE_INDEX, VisionChatCollator
    from rejalign_train.dataset import prepare_samples
    from rejalign_train.fit import end_of_turn_tokens
    from rejalign_train.model_setup import lora_target_modules, projector_path
    from rejalign_train.records import iter_records

    processor = AutoProcessor.from_pretrained(model_dir)
    if template is not None:
        processor.chat_template = template
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    tok = processor.tokenizer
    eot = END_OF_TURN[family]
    eots = end_of_turn_tokens(processor, str(model_dir), False)
    assert eot in eots
    samples, _ = prepare_samples(
        iter_records(data),
        processor,
        ChatRenderer(processor, eots),
        source=str(data),
        image_root=data.parent,
        max_length=2048,
        refusal_sentence=REFUSAL_SENTENCE,
        progress=False,
    )
    assert [s.id for s in samples] == list(REPLIES)
    assert [s.refusal for s in samples] == [False, True, False]
    counts = [s.num_tokens for s in samples]
    image_id = model.config.image_token_id
    for mode in ("mask", "train"):
        batch = VisionChatCollator(processor, refusal_eos=mode)(samples)
        assert all(isinstance(v, torch.Tensor) for v in batch.values())
        assert batch["attention_mask"].sum(dim=1).tolist() == counts
        image_tokens = (batch["input_ids"] == image_id).sum(dim=1).tolist()
        assert image_tokens[0] == 0 and all(n > 0 for n in image_tokens[1:]), image_tokens
        for row, sample in enumerate(samples):
            ids = batch["input_ids"][row][: counts[row]]
            assert (ids == tok.bos_token_id).sum() == (tok.bos_token_id is not None), sample.id
            labels = batch["labels"][row]
            kept = labels[labels != IGNORE_INDEX].tolist()
            expected: list[int] = []
            for reply in REPLIES[sample.id]:
                expected += tok(LEAD[family] + reply + eot, add_special_tokens=False)["input_ids"]
            if sample.refusal and mode == "mask":
                assert expected[-1] == tok.convert_tokens_to_ids(eot)
                expected = expected[:-1]
            assert kept == expected, (mode, sample.id, tok.decode(kept), sample.text)
        with torch.no_grad():
            loss = model(**batch).loss
        assert torch.isfinite(loss) and loss > 0
    # LoRA on the language model only.
    targets = lora_target_modules(model)
    assert targets and all(t.startswith(LANGUAGE_MODEL[family]) for t in targets)
    assert projector_path(model) == PROJECTOR[family]


def test_labels_are_the_replies_and_their_end_of_turn_token(family, model, label_data):
    """Exactly the reply tokens plus the end-of-turn token per assistant turn;
    ``--refusal-eos mask`` drops only the refusal's last one. System prompt, user text, image
    tokens, the template's BOS and whatever follows the end-of-turn token stay out of the loss."""
    _labels(model, label_data, family)


def test_llava_next_labels_with_the_vicuna_template(data_dir, label_data, tmp_path):
    """The vicuna template (no generation marks, the system prompt as is) trains the same."""
    model_dir = build_family("llava_next", tmp_path / "llava-next", data_dir / "tokenizers")
    _labels(model_dir, label_data, "llava_next", LLAVA_VICUNA_TEMPLATE)


def chat_record(rid: str, user: str, reply: str, images=(), system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"id": rid, "images": list(images), "messages": messages}


@pytest.fixture(scope="module")
def count_records(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("family-counts")
    (root / "images").mkdir()
    for name, size in {"wide": (100, 60), "tall": (20, 90), "small": (24, 24)}.items():
        Image.new("RGB", size, (200, 40, 40)).save(root / "images" / f"{name}.png")
    return root, [
        # Gemma 3: the image right after "<start_of_turn>user\n": "\n" + "\n\n<start_of_image>"
        # is one token, not two.
        chat_record("after-newline", "<image>\nWhat is it?", "A red block.", ["images/wide.png"]),
        chat_record("text", "No image here.", "Fine."),
        # After a system prompt (Gemma 3: its "\n\n"), and two images in one turn.
        chat_record("system", "<image>\nColour?", "Red.", ["images/small.png"], "Be brief."),
        chat_record(
            "two", "<image>\n<image>\nCompare.", "Both red.", ["images/tall.png", "images/wide.png"]
        ),  # fmt: skip
    ]


def test_token_counts_are_exact_in_context(family, model, count_records):
    """Each sample's token count (``ImageTokenCounter``, which decodes no image) is the length of
    the processor's own output for that sample alone, and of its collated row."""
    from transformers import AutoConfig, AutoProcessor

    from rejalign_train.chat import ChatRenderer
    from rejalign_train.collator import VisionChatCollator, load_rgb
    from rejalign_train.dataset import add_special_tokens_for, prepare_samples

    root, records = count_records
    processor = AutoProcessor.from_pretrained(model)
    tok = processor.tokenizer
    samples, _ = prepare_samples(
        records,
        processor,
        ChatRenderer(processor),
        source="counts.jsonl",
        image_root=root,
        max_length=2048,
        refusal_sentence=REFUSAL_SENTENCE,
        progress=False,
    )
    image_id = AutoConfig.from_pretrained(model).image_token_id  # Gemma 3's processor names BOI
    alone = []
    for sample in samples:
        images = [load_rgb(p) for p in sample.images]
        ids = processor(
            text=[sample.text],
            images=[images] if images else None,
            add_special_tokens=add_special_tokens_for(tok, sample.text),
        )["input_ids"][0]
        assert sample.num_tokens == len(ids), sample.id
        assert list(ids).count(tok.bos_token_id) == 1, sample.id
        alone.append(list(ids).count(image_id))
    batch = VisionChatCollator(processor, refusal_eos="mask")(samples)
    assert batch["attention_mask"].sum(dim=1).tolist() == [s.num_tokens for s in samples]
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == alone
    assert alone[1] == 0 and all(alone[i] > 0 for i in (0, 2, 3))
    if family in ("llava_next", "idefics3"):  # tiles or crops: the count depends on the size
        assert alone[3] != 2 * alone[0], alone  # "two" holds the tall image and the wide one
    if family == "gemma3":
        assert "<start_of_turn>user\n<start_of_image>What" in samples[0].text
        assert "Be brief.\n\n<start_of_image>" in samples[2].text
        # A per-image constant measured in isolation counts one token too many here.
        boi, blank = processor.boi_token, Image.new("RGB", (100, 60))
        isolated = len(processor(text=[boi], images=[[blank]])["input_ids"][0]) - len(
            tok(boi)["input_ids"]
        )
        text_only = len(tok(samples[0].text, add_special_tokens=False)["input_ids"])
        assert samples[0].num_tokens == text_only + isolated - 1
        assert alone == [4, 0, 4, 8]


@pytest.fixture(scope="module")
def adapter(family, model, tmp_path_factory) -> Path:
    """``rejalign-train fit`` (its defaults: rank 128, projector trained) on image and text-only
    records."""
    from rejalign_train.cli import main as cli_main

    work = tmp_path_factory.mktemp(f"fit-{family}")
    data = fit_data(work)
    out = work / "adapter"
    argv = [
        "fit", "--model", str(model), "--data", str(data), "--output-dir", str(out),
        "--max-steps", "2", "--warmup-steps", "0", "--per-device-train-batch-size", "4",
        "--learning-rate", "1e-3", "--projector-lr", "1e-3", "--dataloader-num-workers", "0",
        "--report-to", "none", "--disable-tqdm", "true",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    return out


def test_fit_writes_an_adapter_on_image_and_text_only_records(family, adapter):
    from safetensors.torch import load_file

    from rejalign_train.manifest import read_manifest

    manifest = read_manifest(adapter)
    assert (manifest["data"]["used"], manifest["data"]["refusal_samples"]) == (8, 3)
    assert manifest["adapter"]["modules_to_save"] == [PROJECTOR[family]]
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 128
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    lm, projector = "base_model.model." + LANGUAGE_MODEL[family], PROJECTOR[family] + "."
    assert keys and all(k.startswith(lm) or projector in k for k in keys), sorted(keys)[:5]
    assert any(projector in k for k in keys) and any("lora_A" in k for k in keys)
    # The processor with its chat template travels with the adapter, for lm-eval and vLLM.
    assert (adapter / "chat_template.jinja").is_file()


def hf_args(model: Path, extra: str = "") -> list[str]:
    args = f"pretrained={model},dtype=float32" + (f",{extra}" if extra else "")
    return ["--model", "hf-multimodal", "--model_args", args, "--apply_chat_template",
            "--device", "cpu", "--batch_size", str(LIMIT)]  # fmt: skip


@pytest.fixture(scope="module")
def hf_runs(family, model, adapter, tmp_path_factory, data_dir) -> dict[str, list[str]]:
    """``lm_eval --model hf-multimodal`` on FigStep-Tiny, base and ``peft=`` the fit adapter."""
    runs = {}
    for name, extra in (("base", ""), ("adapter", f"peft={adapter}")):
        proc, results, samples = run_lm_eval(
            [*hf_args(model, extra), "--tasks", TASK, "--limit", str(LIMIT), *GEN],
            tmp_path_factory.mktemp(f"hf-{family}-{name}"),
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        metrics = results["results"][TASK]
        assert results["n-samples"][TASK]["effective"] == LIMIT
        assert 0.0 <= metrics["asr,none"] <= 1.0 and 0.0 <= metrics["refusal_rate,none"] <= 1.0
        runs[name] = completions(samples[TASK])
    assert all(text.strip() for text in runs["base"] + runs["adapter"]), runs
    assert runs["adapter"] != runs["base"]  # the adapter is applied
    return runs


def test_hf_multimodal_scores_figstep_with_and_without_the_adapter(hf_runs):
    assert len(hf_runs["base"]) == len(hf_runs["adapter"]) == LIMIT


def test_vllm_vlm_with_the_fit_adapter_equals_hf_multimodal(
    family, vllm_python, model, adapter, hf_runs, tmp_path
):
    """vLLM (CPU) serves the tiny model with the fit adapter (rank 128, projector trained) as
    ``lora_local_path=``; greedy float32 completions equal transformers' token for token."""
    proc, results, samples = run_vllm_lm_eval(
        vllm_python,
        ["--model", "vllm-vlm", "--model_args",
         f"pretrained={model},{VLLM_ARGS},lora_local_path={adapter}",
         "--apply_chat_template", "--tasks", TASK, "--limit", str(LIMIT), *GEN],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert results["config"]["model_args"]["lora_local_path"] == str(adapter)
    assert f"Resolved architecture: {ARCHITECTURE[family]}" in proc.stdout + proc.stderr
    got = completions(samples[TASK])
    if family in SENTENCEPIECE:
        # transformers decodes the completion alone, whose first "▁" its decoder strips; vLLM
        # decodes it after the prompt and keeps that "▁" as a space.
        got = [text.removeprefix(" ") for text in got]
    assert got == hf_runs["adapter"]
