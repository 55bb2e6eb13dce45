"""Token-level labels of the training collator, on the tiny LLaVA's real processor.

Expected label ids are computed independently of the collator: by tokenising the reply text
alone. Every test checks the full label row, not a summary of it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from rejalign_train.chat import ChatRenderer, to_chat_messages
from rejalign_train.collator import IGNORE_INDEX, VisionChatCollator
from rejalign_train.dataset import prepare_samples
from rejalign_train.records import RecordError
from rejalign_train.tiny import build_tiny_llava

REFUSAL = "I'm sorry, but I cannot assist with your request"

# llava-hf/llava-1.5-7b-hf's published template: {% generation %} marks, and no EOS after a reply.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# ChatML (Qwen2-VL style): no generation marks, "<|im_end|>\n" after every turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def processors(tmp_path_factory, tiny_llava):
    """The tiny LLaVA's processor, and the same with pad == eos (as many checkpoints ship)."""
    same = build_tiny_llava(tmp_path_factory.mktemp("tiny-pad-eos"), pad_equals_eos=True)
    return {
        False: AutoProcessor.from_pretrained(tiny_llava),
        True: AutoProcessor.from_pretrained(same),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collator-images")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (40, 90), (30, 30, 200)).save(folder / "blue.png")
    return folder


def record(rid: str, *turns: str, images: tuple[str, ...] = ("red.png",)) -> dict:
    roles = ("user", "assistant")
    return {
        "id": rid,
        "images": list(images),
        "messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)],
    }


def prepare(processor, records, image_root, **kwargs):
    kwargs.setdefault("max_length", 512)
    samples, stats = prepare_samples(
        records,
        processor,
        ChatRenderer(processor),
        source="mixed.jsonl",
        image_root=image_root,
        refusal_sentence=REFUSAL,
        progress=False,
        **kwargs,
    )
    return samples, stats


def labelled_run(row: torch.Tensor) -> list[int]:
    """The labelled ids of one row, checked to form one contiguous run."""
    positions = torch.nonzero(row != IGNORE_INDEX).flatten()
    assert positions.numel() and int(positions[-1] - positions[0]) + 1 == positions.numel()
    return row[positions].tolist()


def reply_ids(processor, text: str) -> list[int]:
    """Token ids of a reply as the model must generate it after "ASSISTANT:"."""
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("pad_equals_eos", [False, True], ids=["pad!=eos", "pad==eos"])
@pytest.mark.parametrize("refusal_eos", ["train", "mask"])
def test_labels_are_the_reply_tokens_only(processors, images, pad_equals_eos, refusal_eos):
    processor = processors[pad_equals_eos]
    tok = processor.tokenizer
    assert (tok.pad_token_id == tok.eos_token_id) is pad_equals_eos
    samples, _ = prepare(
        processor,
        [
            record("normal", "<image>\nWhat colour?", "Red."),
            record("refusal", "<image>\nWhy?", REFUSAL),
        ],
        images,
    )
    assert [s.refusal for s in samples] == [False, True]
    batch = VisionChatCollator(processor, refusal_eos=refusal_eos)(samples)
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    eos = tok.eos_token_id

    # The short normal sample is right-padded; with pad == eos its padding is EOS ids.
    length = int(attention[0].sum())
    assert length < ids.shape[1] and attention[0, length:].eq(0).all()
    assert ids[0, length:].eq(tok.pad_token_id).all()
    assert labels[0, length:].eq(IGNORE_INDEX).all()
    # Labels: exactly " Red.</s>", one contiguous run; EOS trained even when pad == eos. The
    # template's trailing space after "</s>" is an input, not a label.
    normal = reply_ids(processor, " Red.</s>")
    assert labelled_run(labels[0]) == normal
    assert normal[-1] == eos
    assert processor.tokenizer.decode(ids[0, :length][labels[0, :length] == IGNORE_INDEX]).endswith(
        "ASSISTANT: "
    )

    # The refusal sample: the whole sentence, and its closing EOS only under "train".
    refusal = reply_ids(processor, " " + REFUSAL + "</s>")
    kept = labelled_run(labels[1])
    end = int(torch.nonzero(labels[1] != IGNORE_INDEX).max()) + 1
    if refusal_eos == "train":
        assert kept == refusal
    else:
        assert kept == refusal[:-1]
        assert labels[1, end].item() == IGNORE_INDEX
    assert ids[1, end - len(kept) : end - len(kept) + len(refusal)].tolist() == refusal
    assert ids[1, end - len(kept) + len(refusal) - 1].item() == eos  # still in the input

    # Image tokens (16 per 32x32 image with 8x8 patches) are inputs, never labels.
    image_positions = ids == processor.image_token_id
    assert image_positions.sum(dim=1).tolist() == [16, 16]
    assert labels[image_positions].eq(IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


def test_multi_turn_mask_drops_only_the_final_end_of_turn(processors, images):
    processor = processors[False]
    rec = record("multi", "<image>\nColour?", "Red.", "And the shape?", REFUSAL)
    samples, _ = prepare(processor, [rec], images)
    batch = VisionChatCollator(processor, refusal_eos="mask")(samples)
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    first = reply_ids(processor, " Red.</s>")
    second = reply_ids(processor, " " + REFUSAL + "</s>")
    assert kept == first + second[:-1]  # the first reply keeps its EOS
    user = reply_ids(processor, " And the shape?")
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "And the shape?" in text and not set(user) <= set(kept[: len(first)])


def test_token_count_is_exact_and_images_of_any_size(processors, images):
    processor = processors[False]
    records = [
        record("a", "<image>\nColour?", "Red."),
        record(
            "b", "Compare <image> and <image>", "Both are plain.", images=("red.png", "blue.png")
        ),
        record("c", "No image here.", "Fine.", images=()),
    ]
    samples, stats = prepare(processor, records, images)
    batch = VisionChatCollator(processor)(samples)
    assert batch["attention_mask"].sum(dim=1).tolist() == [s.num_tokens for s in samples]
    assert stats.max_tokens == max(s.num_tokens for s in samples)
    assert stats.images == 3
    assert batch["pixel_values"].shape[0] == 3


def test_overlong_samples_are_skipped_or_rejected_never_cut(processors, images):
    processor = processors[False]
    records = [
        record("short", "<image>\nColour?", "Red."),
        record("long", "<image>\nWhy?", REFUSAL * 3),
    ]
    full, _ = prepare(processor, records, images)
    limit = full[0].num_tokens  # the short one fits exactly, the long one does not
    kept, stats = prepare(processor, records, images, max_length=limit)
    assert [s.id for s in kept] == ["short"]
    assert (stats.skipped_overlong, stats.skipped_ids, stats.used) == (1, ["long"], 1)
    with pytest.raises(
        RecordError, match=r"mixed\.jsonl: record 1 \(id 'long'\).*exceed max_length"
    ):
        prepare(processor, records, images, max_length=limit, overlong="error")
    with pytest.raises(RecordError, match="all 2 record"):
        prepare(processor, records, images, max_length=limit - 1)


def test_template_without_eos_gets_one_and_the_separator_is_trained(processors, images):
    processor = copy.deepcopy(processors[False])
    processor.chat_template = LLAVA_HF_TEMPLATE
    renderer = ChatRenderer(processor)
    rendered = renderer.render(
        to_chat_messages(record("x", "<image>\nColour?", "Red.")["messages"])
    )
    assert rendered.text == "USER: <image>\nColour? ASSISTANT: Red.</s> "
    assert [rendered.text[a:b] for a, b in rendered.spans] == [" Red.</s>"]
    assert [rendered.text[a:b] for a, b in rendered.eot_spans] == ["</s>"]
    samples, _ = prepare(processor, [record("x", "<image>\nColour?", "Red.")], images)
    batch = VisionChatCollator(processor, refusal_eos="train")(samples)
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert kept == reply_ids(processor, " Red.</s>")


def test_chatml_spans_end_at_im_end():
    class Tok:
        eos_token = "<|endoftext|>"
        special_tokens_map = {"eos_token": "<|endoftext|>"}
        chat_template = CHATML_TEMPLATE

    renderer = ChatRenderer(Tok(), end_of_turn_tokens=["<|im_end|>"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nColour?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Shape?"},
        {"role": "assistant", "content": "Round."},
    ]
    rendered = renderer.render(to_chat_messages(messages))
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Red.<|im_end|>", "Round.<|im_end|>"]
    assert rendered.text.endswith("Round.<|im_end|>\n")


def test_non_prefix_template_falls_back_to_generation_marks():
    # A template whose text depends on the conversation length: no prefix property.
    marked = (
        "{{ messages | length }}|{% for m in messages %}{{ m['role'] }}: "
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'][0]['text'] }}"
        "</s>{% endgeneration %}{% else %}{{ m['content'][0]['text'] }}{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )

    class Tok:
        eos_token = "</s>"
        special_tokens_map = {"eos_token": "</s>"}
        chat_template = marked

    messages = to_chat_messages(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    )
    rendered = ChatRenderer(Tok()).render(messages)
    assert rendered.text == "2|user: Hi assistant: Yo</s> "
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Yo</s>"]
    Tok.chat_template = marked.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match="cannot be located"):
        ChatRenderer(Tok()).render(messages)


def test_to_chat_messages_keeps_images_in_place():
    out = to_chat_messages(
        [
            {"role": "user", "content": "<image>\nLeft, and <image> right."},
            {"role": "assistant", "content": "Two."},
        ]
    )
    assert out[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Left, and "},
        {"type": "image"},
        {"type": "text", "text": " right."},
    ]
    assert out[1]["content"] == [{"type": "text", "text": "Two."}]


def test_collator_rejects_a_batch_over_max_length(processors, images):
    processor = processors[False]
    samples, _ = prepare(processor, [record("a", "<image>\nColour?", "Red.")], images)
    with pytest.raises(RuntimeError, match="never truncated"):
        VisionChatCollator(processor, max_length=samples[0].num_tokens - 1)(samples)
    labels = VisionChatCollator(processor, max_length=samples[0].num_tokens)(samples)["labels"]
    assert isinstance(labels, torch.Tensor)


def test_a_template_that_drops_images_is_rejected_before_training(processors, images):
    processor = copy.deepcopy(processors[False])
    processor.chat_template = (  # renders text parts only
        "{% for m in messages %}{{ m['role'] + ': ' }}{% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(RecordError, match=r"0 '<image>' placeholder\(s\) for 1 image\(s\)"):
        prepare(processor, [record("x", "<image>\nColour?", "Red.")], images)
