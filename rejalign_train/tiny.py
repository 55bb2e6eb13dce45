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


if __name__ == "__main__":  # pragma: no cover - manual helper
    import sys

    print(build_tiny_llava(sys.argv[1] if len(sys.argv) > 1 else "tiny-llava"))
