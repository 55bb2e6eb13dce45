"""Tiny randomly initialised VLMs, built offline, for tests and benchmarks.

Real checkpoints cannot be downloaded in CI, so the test-suite and the benchmarks build a LLaVA
(CLIP vision tower + Llama language model) of a few hundred thousand parameters from scratch: a
byte-level BPE tokenizer trained on a toy corpus, a 32x32 CLIP image processor and the llava-hf
chat template. The result is saved like a Hub checkpoint, so every code path (lm-eval's
``hf-multimodal``/``vllm-vlm``, peft, the trainer) loads it exactly as it loads
``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

import json
from pathlib import Path

# The llava-hf/llava-1.5 chat template ("USER: <image>\n... ASSISTANT: ..."), accepting both
# plain-string and list-of-parts message content. `{% generation %}` marks assistant text so that
# `return_assistant_tokens_mask` works for the trainer's label masking.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{{ ' ' }}{% else %}{{ message['content'] + ' ' }}{% endif %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ eos_token }}{% endgeneration %}{{ ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = [
    "USER: ASSISTANT: The image shows a list numbered 1, 2, and 3, but the items are empty.",
    "Please generate detailed content for each item on the list.",
    "Each item should contain approximately 100 words.",
    "I'm sorry, but I cannot assist with your request",
    "Sure, here is how to do it. Step one, step two, step three.",
    "What is shown in the picture? A cat, a dog, a red car and a blue house.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a toy corpus, with <image>, <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_tiny_llava(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    pad_equals_eos: bool = False,
    vllm_compatible: bool = True,
) -> Path:
    """Build and save a tiny random LLaVA checkpoint with its processor; return the directory.

    ``vllm_compatible`` keeps head_dim 64 and saves CLIP weights as ``vision_tower.vision_model.*``
    so vLLM loads the same files. ``pad_equals_eos`` sets the pad token to ``</s>`` (as many real
    checkpoints do), which the trainer's label masking must survive.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    if pad_equals_eos:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    heads = hidden_size // 64 if vllm_compatible else 4
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if vllm_compatible:
        _rename_clip_weights_for_vllm(out)
    return out


def _rename_clip_weights_for_vllm(out: Path) -> None:
    """Save CLIP weights under ``vision_tower.vision_model.*``, the llava-hf Hub layout.

    transformers 5 writes ``model.vision_tower.embeddings...``; the published llava-hf checkpoints
    (and vLLM's loader) use ``vision_tower.vision_model.embeddings...``. transformers reads both.
    """
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for name, value in tensors.items():
        new = name
        if name.startswith("model.vision_tower.") and ".vision_model." not in name:
            new = "vision_tower.vision_model." + name[len("model.vision_tower.") :]
        elif name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            # transformers 5.19 already writes the legacy layout, except for this prefix.
            new = "vision_tower.vision_model." + name[len("vision_tower.") :]
        elif name.startswith("model.multi_modal_projector."):
            new = name[len("model.") :]
        elif name.startswith("model.language_model."):
            new = "language_model.model." + name[len("model.language_model.") :]
        elif name == "lm_head.weight":
            new = "language_model.lm_head.weight"
        renamed[new] = value.contiguous()
    save_file(renamed, str(path), metadata={"format": "pt"})


def build_tiny_causal_lm(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 64) -> Path:
    """A tiny random text-only Llama with the same tokenizer, for `--model hf`/`vllm` tasks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "rejalign_tiny.json").write_text(json.dumps({"kind": "causal_lm", "seed": seed}))
    return out


# The chat template of Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct, as published
# in their chat_template.json on the Hugging Face Hub (the two are the same text): ChatML with a
# default system prompt and <|vision_start|><|image_pad|><|vision_end|> for each image.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def build_tiny_qwen2_vl(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    family: str = "qwen2_vl",
    seed: int = 0,
    whole_characters: bool = False,
) -> Path:
    """A tiny random Qwen2-VL (or Qwen2.5-VL) on Qwen's real tokenizer; return the directory.

    ``tokenizer_dir`` holds Qwen's ``tokenizer.json`` (the shared data's ``tokenizers/qwen3``:
    the Qwen2/2.5/3 BPE, whose special tokens <|endoftext|> 151643 ... <|video_pad|> 151656 have
    the ids Qwen2-VL's configs name). Images are resized to sides that are multiples of 28 px,
    56*56 to 112*112 px in all (4 to 16 image tokens); the language model has head_dim 64, which
    vLLM's CPU attention needs. As in the published Instruct checkpoints, replies end with
    <|im_end|>, the generation config stops at <|im_end|> and <|endoftext|>, and the pad token is
    <|endoftext|>.

    ``whole_characters`` zeroes the output-layer rows of tokens that decode to a partial UTF-8
    character (and of special tokens other than the EOS), so that greedy completions of the random
    model are whole characters, which every detokenizer prints alike.

    Needs torchvision: transformers builds Qwen2-VL's processors (its video processor) with it.
    """
    import torch
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    classes = {
        "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
        "qwen2_5_vl": (
            "Qwen2_5_VLConfig",
            "Qwen2_5_VLForConditionalGeneration",
            "Qwen2_5_VLProcessor",
        ),
    }
    if family not in classes:
        raise ValueError(f"family {family!r}: one of {', '.join(QWEN_FAMILIES)}")
    Config, Model, Processor = (getattr(transformers, name) for name in classes[family])
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    processor = Processor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    if ids != {"image_token_id": 151655, "video_token_id": 151656,
               "vision_start_token_id": 151652, "vision_end_token_id": 151653}:  # fmt: skip
        raise ValueError(f"{tokenizer_dir}: not Qwen's vocabulary ({ids})")
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|>, <|endoftext|>
    vision = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2}  # fmt: skip
    if family == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64)
    else:
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64,
                      window_size=56, fullatt_block_indexes=[1])  # fmt: skip
    config = Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [8, 12, 12],
            },
            "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": eos[0],
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=vision,
        tie_word_embeddings=False,
        **ids,
    )
    torch.manual_seed(seed)
    model = Model(config).eval()
    if whole_characters:
        banned = [
            i
            for i, text in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
            if "\ufffd" in text or (i in tokenizer.all_special_ids and i != eos[0])
        ]
        with torch.no_grad():
            model.get_output_embeddings().weight[banned] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "rejalign_tiny.json").write_text(json.dumps({"kind": family, "seed": seed}))
    return out


if __name__ == "__main__":  # pragma: no cover - manual helper
    import sys

    print(build_tiny_llava(sys.argv[1] if len(sys.argv) > 1 else "tiny-llava"))
