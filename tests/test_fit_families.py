"""fit beyond LLaVA: a tiny random Idefics3 (the SmolVLM family), built offline.

Idefics3 differs from LLaVA wherever the trainer could have assumed LLaVA: a ChatML-like template
without ``{% generation %}`` marks whose turns end with ``<end_of_utterance>``, a BOS written by
the template, images split into a size-dependent number of crops (so the image-token count
depends on the image), extra tokens around each crop, and differently named modules (the
language model is ``model.text_model``, the projector ``model.connector``).

Gemma 3, with its real tokenizer and chat template (shared data) and a tiny random model: its
processor expands ``<start_of_image>`` into text that starts and ends with two newlines, which
merge with the newlines around the placeholder, so an image's token count depends on its context.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from rejalign_train.chat import ChatRenderer
from rejalign_train.cli import main as cli_main
from rejalign_train.collator import IGNORE_INDEX, VisionChatCollator, load_rgb
from rejalign_train.dataset import add_special_tokens_for, prepare_samples
from rejalign_train.fit import end_of_turn_tokens
from rejalign_train.manifest import read_manifest
from rejalign_train.mixing import REFUSAL_SENTENCE
from rejalign_train.model_setup import lora_target_modules, projector_path
from rejalign_train.records import iter_records
from rejalign_train.synthetic import write_jsonl

# SmolVLM-Instruct's chat template.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_idefics3(out: Path) -> Path:
    """A random Idefics3 with 32-pixel crops of images scaled to 64 pixels (up to 2x2 crops)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    from rejalign_train.tiny import _CORPUS

    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>"]
    specials += ["<fake_token_around_image>", "<global-img>"]
    specials += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=450,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=SMOLVLM_TEMPLATE,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=4,
        chat_template=SMOLVLM_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_idefics3(tmp_path_factory) -> Path:
    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny-idefics3"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("idefics3-data")
    (root / "images").mkdir()
    sizes = {"wide": (100, 60), "tall": (20, 90), "small": (24, 24)}
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 40, 40)).save(root / "images" / f"{name}.png")
    records = [
        {
            "id": name,
            "image": f"images/{name}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": REFUSAL_SENTENCE if name == "tall" else "A red block."},
            ],
        }
        for name in sizes
    ]
    return write_jsonl(root / "mixed.jsonl", records)


def test_idefics3_labels_and_token_counts(tiny_idefics3, data):
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    model = AutoModelForImageTextToText.from_pretrained(tiny_idefics3)
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    renderer = ChatRenderer(processor, end_of_turn_tokens(processor, str(tiny_idefics3), False))
    assert not renderer.has_generation_tags
    samples, _ = prepare_samples(
        iter_records(data),
        processor,
        renderer,
        source=str(data),
        image_root=data.parent,
        max_length=512,
        refusal_sentence=REFUSAL_SENTENCE,
        progress=False,
    )
    counts = [s.num_tokens for s in samples]
    assert len(set(counts)) > 1  # image tokens depend on the image's shape
    batch = VisionChatCollator(processor, refusal_eos="mask")(samples)
    assert batch["attention_mask"].sum(dim=1).tolist() == counts
    tok = processor.tokenizer
    for row, sample in enumerate(samples):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        reply = REFUSAL_SENTENCE if sample.refusal else "A red block."
        expected = tok(" " + reply + "<end_of_utterance>", add_special_tokens=False)["input_ids"]
        assert kept == (expected[:-1] if sample.refusal else expected), (
            sample.id,
            tok.decode(kept),
        )
        ids = batch["input_ids"][row][: counts[row]]
        assert ids[0].item() == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)

    # LoRA on the text model only; the connector is the projector.
    targets = lora_target_modules(model)
    assert targets and all(t.startswith("model.text_model.layers.") for t in targets)
    assert projector_path(model) == "model.connector"


def test_fit_trains_an_idefics3_adapter(tiny_idefics3, data, tmp_path):
    out = tmp_path / "adapter"
    argv = [
        "fit", "--model", str(tiny_idefics3), "--data", str(data), "--output-dir", str(out),
        "--per-device-train-batch-size", "3", "--max-steps", "2", "--learning-rate", "1e-3",
        "--dataloader-num-workers", "0", "--disable-tqdm", "true",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    manifest = read_manifest(out)
    assert manifest["adapter"]["modules_to_save"] == ["model.connector"]
    assert (manifest["data"]["used"], manifest["data"]["refusal_samples"]) == (3, 1)
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert all(
        k.startswith(("base_model.model.model.text_model.", "base_model.model.model.connector."))
        for k in keys
    )


def chat_record(rid: str, user: str, reply: str, images=(), system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"id": rid, "images": list(images), "messages": messages}


def test_idefics3_batch_whose_first_record_is_text_only(tiny_idefics3, data):
    # Idefics3Processor converts every output to tensors, the per-image replacement records
    # (return_text_replacement_offsets) included; with no image in the first row that used to
    # fail: "Unable to convert output 'text_replacement_offsets' (type: list) to tensor".
    processor = AutoProcessor.from_pretrained(tiny_idefics3)
    model = AutoModelForImageTextToText.from_pretrained(tiny_idefics3)
    renderer = ChatRenderer(processor, end_of_turn_tokens(processor, str(tiny_idefics3), False))
    replies = ["Fine.", "A red block.", "A tall red block."]
    records = [
        chat_record("text", "No image here.", replies[0]),
        chat_record("wide", "<image>\nWhat is it?", replies[1], ["images/wide.png"]),
        chat_record("tall", "What is <image> here?", replies[2], ["images/tall.png"]),
    ]
    samples, _ = prepare_samples(
        records,
        processor,
        renderer,
        source="mixed.jsonl",
        image_root=data.parent,
        max_length=512,
        refusal_sentence=REFUSAL_SENTENCE,
        progress=False,
    )
    batch = VisionChatCollator(processor, refusal_eos="mask")(samples)
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    assert batch["attention_mask"].sum(dim=1).tolist() == [s.num_tokens for s in samples]
    image_tokens = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert image_tokens[0] == 0 and all(n > 0 for n in image_tokens[1:])
    tok = processor.tokenizer
    for row, reply in enumerate(replies):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        expected = tok(" " + reply + "<end_of_utterance>", add_special_tokens=False)["input_ids"]
        assert kept == expected, (samples[row].id, tok.decode(kept))
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


@pytest.fixture(scope="module")
def gemma3(data_dir):
    """Gemma 3's processor on its real tokenizer and chat template (32-pixel images, 4 tokens
    each), and a tiny random Gemma3ForConditionalGeneration that matches it."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    folder = data_dir / "tokenizers" / "gemma3"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        **{k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        extra_special_tokens=config["extra_special_tokens"],
        chat_template=config["chat_template"],
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=config["chat_template"],
    )
    model_config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 64,
            "max_position_embeddings": 512,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        mm_tokens_per_image=4,
    )
    assert model_config.image_token_id == tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    torch.manual_seed(0)
    return processor, Gemma3ForConditionalGeneration(model_config).eval()


def test_gemma3_token_counts_are_exact_in_context(gemma3, data):
    processor, model = gemma3
    tok = processor.tokenizer
    replies = ["A red block.", "Fine.", "Red.", "Both red."]
    records = [
        # The image right after "<start_of_turn>user\n": "\n" + "\n\n<start_of_image>..." is
        # one token, not two.
        chat_record("after-newline", "<image>\nWhat is it?", replies[0], ["images/wide.png"]),
        chat_record("text", "No image here.", replies[1]),
        # After the system prompt's "\n\n", and between two images ("\n\n" + "\n\n").
        chat_record("system", "<image>\nColour?", replies[2], ["images/small.png"], "Be brief."),
        chat_record(
            "two", "<image>\n<image>\nCompare.", replies[3], ["images/tall.png", "images/wide.png"]
        ),
    ]
    samples, _ = prepare_samples(
        records,
        processor,
        ChatRenderer(processor),
        source="mixed.jsonl",
        image_root=data.parent,
        max_length=512,
        refusal_sentence=REFUSAL_SENTENCE,
        progress=False,
    )
    assert "<start_of_turn>user\n<start_of_image>What" in samples[0].text
    assert "Be brief.\n\n<start_of_image>" in samples[2].text

    # Each count is the length of the processor's own output for that sample alone ...
    for sample in samples:
        images = [load_rgb(p) for p in sample.images]
        ids = processor(
            text=[sample.text],
            images=[images] if images else None,
            add_special_tokens=add_special_tokens_for(tok, sample.text),
        )["input_ids"][0]
        assert sample.num_tokens == len(ids), sample.id
        assert ids.count(tok.bos_token_id) == 1
    # ... where a per-image constant measured in isolation counts one token too many.
    boi, blank = processor.boi_token, Image.new("RGB", (100, 60))
    isolated = len(processor(text=[boi], images=[[blank]])["input_ids"][0]) - len(
        tok(boi)["input_ids"]
    )
    text_only = len(tok(samples[0].text, add_special_tokens=False)["input_ids"])
    assert samples[0].num_tokens == text_only + isolated - 1

    # ... and of the collated batch (text-only row included); labels are the replies only.
    batch = VisionChatCollator(processor, refusal_eos="mask")(samples)
    assert batch["attention_mask"].sum(dim=1).tolist() == [s.num_tokens for s in samples]
    assert (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [4, 0, 4, 8]
    for row, reply in enumerate(replies):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == tok(reply + "<end_of_turn>", add_special_tokens=False)["input_ids"], (
            samples[row].id,
            tok.decode(kept),
        )
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
