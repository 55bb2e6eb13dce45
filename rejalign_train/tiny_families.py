"""Tiny random LLaVA-1.5, LLaVA-NeXT, Gemma 3 and Idefics3 models on the families' real tokenizers.

Where tokenisation matters (which tokens a reply and its end-of-turn marker become, how an image
expansion merges with its context, how many image tokens a size gives) a toy tokenizer proves
nothing, so these builders take each family's published tokenizer (a ``tokenizer.json`` folder:
Llama-2, Llama 3, Gemma 3) and its published chat template, and put a randomly initialised model
behind it: 4 M (LLaVA) to 34 M (Gemma 3) parameters, nearly all of them the vocabulary's
embedding rows. The language models have head_dim 64 (what vLLM's CPU attention takes) and the
folders load in transformers, peft, lm-eval and vLLM alike.

``whole_characters`` zeroes the output-layer rows of tokens that decode to a partial UTF-8
character (and of special tokens other than the end-of-turn ones), so that greedy completions of
a random model are whole characters, which every detokenizer prints alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rejalign_train.tiny import _rename_clip_weights_for_vllm

# llava-hf's chat template for llava-1.5-7b-hf and llava-v1.6-vicuna-7b-hf (their
# chat_template.json; quoted verbatim in openvinotoolkit/openvino.genai@c395a8d4,
# src/cpp/src/tokenizer.cpp). Replies end with a space and no EOS: the trainer appends the EOS.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The vicuna template of LLaVA-NeXT's conversions (huggingface/transformers@1d2fe0d8,
# src/transformers/models/llava_next_video/convert_llava_next_video_weights_to_hf.py,
# ``chat_vicuna``): a system prompt written as is, no {% generation %} marks. As upstream wrote
# it, a system message's text comes out twice (once as is, once from the text loop).
LLAVA_VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    "{% else %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Idefics3-8B-Llama3's chat template: SmolVLM's (huggingface/transformers,
# tests/models/idefics3/test_processing_idefics3.py) with Llama 3's BOS in place of <|im_start|>.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

FAMILIES = ("llava15", "llava_next", "gemma3", "idefics3")
TOKENIZERS = {"llava15": "llama2", "llava_next": "llama2", "gemma3": "gemma3",
              "idefics3": "llama3_1"}  # fmt: skip


def _whole_characters(model, tokenizer, keep: list[int]) -> None:
    """Zero the output rows of partial-character tokens and of special tokens not in ``keep``."""
    import torch

    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    banned = [
        i for i, text in enumerate(texts) if "\ufffd" in text or (i in special and i not in keep)
    ]
    with torch.no_grad():
        model.get_output_embeddings().weight[banned] = 0.0


def _finish(model, processor, out: Path, family: str, eos: list[int], pad: int, bos: int | None):
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=pad
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "rejalign_tiny.json").write_text(json.dumps({"kind": family, "seed": 0}))
    return out


def llama2_tokenizer(tokenizer_dir: str | Path, chat_template: str):
    """Llama-2's tokenizer as llava-hf extends it: ``<image>`` 32000 and ``<pad>`` 32001."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=chat_template,
    )
    tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    got = tok.convert_tokens_to_ids(["<image>", "<pad>"])
    if got != [32000, 32001]:
        raise ValueError(f"{tokenizer_dir}: not Llama-2's vocabulary (<image>, <pad> = {got})")
    return tok


def _clip_llama(tokenizer, image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    return vision, text


def _finish_llava(
    model_cls: Any, config: Any, tok: Any, processor: Any, out: Path, family: str,
    whole_characters: bool,
) -> Path:
    """Random weights for a LLaVA-family ``config``, saved for transformers and vLLM."""
    import torch

    torch.manual_seed(0)
    model = model_cls(config).eval()
    if whole_characters:
        _whole_characters(model, tok, [tok.eos_token_id])
    _finish(model, processor, out, family, [tok.eos_token_id], tok.pad_token_id,
            tok.bos_token_id)  # fmt: skip
    _rename_clip_weights_for_vllm(out)
    return out


def build_tiny_llava15(
    out_dir: str | Path, tokenizer_dir: str | Path, *, whole_characters: bool = True
) -> Path:
    """LlavaForConditionalGeneration on Llama-2's tokenizer with llava-hf's template (32-pixel
    CLIP crops, patch 8: 16 image tokens)."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = llama2_tokenizer(tokenizer_dir, LLAVA_HF_TEMPLATE)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_HF_TEMPLATE,
    )  # fmt: skip
    vision, text = _clip_llama(tok, 32, 8)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=32000,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        tie_word_embeddings=False,
    )  # fmt: skip
    return _finish_llava(
        LlavaForConditionalGeneration, config, tok, processor, out, "llava15", whole_characters
    )


def build_tiny_llava_next(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    chat_template: str = LLAVA_HF_TEMPLATE,
    whole_characters: bool = True,
) -> Path:
    """LlavaNextForConditionalGeneration on Llama-2's tokenizer (llava-v1.6-vicuna-hf's setup):
    "anyres" tiling of 32-pixel crops on a 32/64-pixel grid, so the token count of an image
    depends on its shape."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = llama2_tokenizer(tokenizer_dir, chat_template)
    grid = [[32, 64], [64, 32], [64, 64]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=grid,
        ),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template,
    )  # fmt: skip
    vision, text = _clip_llama(tok, 32, 8)
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=32000, image_grid_pinpoints=grid,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        tie_word_embeddings=False,
    )  # fmt: skip
    return _finish_llava(
        LlavaNextForConditionalGeneration, config, tok, processor, out, "llava_next",
        whole_characters,
    )


def gemma3_tokenizer(tokenizer_dir: str | Path):
    """Gemma 3's tokenizer with its chat template and image tokens, from tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(tokenizer_dir)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        **{k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        extra_special_tokens=config["extra_special_tokens"],
        chat_template=config["chat_template"],
        padding_side="left",
    )


def build_tiny_gemma3(
    out_dir: str | Path, tokenizer_dir: str | Path, *, whole_characters: bool = True
) -> Path:
    """Gemma3ForConditionalGeneration on Gemma 3's tokenizer and template: 32-pixel SigLIP
    images pooled to 4 tokens each; replies end with <end_of_turn>, which the generation config
    (like the published one) stops at, with <eos>."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = gemma3_tokenizer(tokenizer_dir)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tok,
        image_seq_length=4,
        chat_template=tok.chat_template,
    )
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
            "head_dim": 64, "sliding_window": 512, "max_position_embeddings": 1024,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
        },
        mm_tokens_per_image=4,
        tie_word_embeddings=False,
    )  # fmt: skip
    if config.image_token_id != tok.convert_tokens_to_ids(tok.image_token):
        raise ValueError(f"{tokenizer_dir}: not Gemma 3's vocabulary")
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    eos = [tok.convert_tokens_to_ids("<eos>"), tok.eos_token_id]  # <eos> 1, <end_of_turn> 106
    if whole_characters:
        _whole_characters(model, tok, eos)
    _finish(model, processor, out, "gemma3", eos, tok.pad_token_id, tok.bos_token_id)
    _rename_clip_weights_for_vllm(out)  # SigLIP as vision_tower.vision_model.*, too
    return out


def build_tiny_idefics3(
    out_dir: str | Path, tokenizer_dir: str | Path, *, whole_characters: bool = True
) -> Path:
    """Idefics3ForConditionalGeneration on Llama 3.1's tokenizer with Idefics3's template:
    images scaled to 64 pixels and split into 32-pixel crops (up to 2x2 and a global one), each
    crop 4 tokens between <fake_token_around_image> and a <row_i_col_j> / <global-img> tag;
    replies end with <end_of_utterance>."""
    import torch
    from transformers import (
        AddedToken,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        pad_token="<|reserved_special_token_0|>",  # 128002: no new row
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=IDEFICS3_TEMPLATE,
    )
    added = ["<fake_token_around_image>", "<end_of_utterance>"]
    tags = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)] + ["<global-img>"]
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in added
            ]
        }  # fmt: skip
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    tok.eos_token = "<end_of_utterance>"
    if tok.convert_tokens_to_ids("<|begin_of_text|>") != 128000:
        raise ValueError(f"{tokenizer_dir}: not Llama 3's vocabulary")
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(
            size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
            do_image_splitting=True,
        ),
        tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE,
    )  # fmt: skip
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
        },
        text_config={
            "model_type": "llama", "vocab_size": len(tok), "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
            "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 1024,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False,
        },
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    if whole_characters:
        _whole_characters(model, tok, [tok.eos_token_id])
    return _finish(model, processor, out, "idefics3", [tok.eos_token_id], tok.pad_token_id,
                   tok.bos_token_id)  # fmt: skip


def build_family(family: str, out_dir: str | Path, tokenizers_root: str | Path) -> Path:
    """One tiny model of ``family`` (see FAMILIES) on its tokenizer under ``tokenizers_root``."""
    builders = {"llava15": build_tiny_llava15, "llava_next": build_tiny_llava_next,
                "gemma3": build_tiny_gemma3, "idefics3": build_tiny_idefics3}  # fmt: skip
    if family not in builders:
        raise ValueError(f"family {family!r}: one of {', '.join(FAMILIES)}")
    return builders[family](out_dir, Path(tokenizers_root) / TOKENIZERS[family])
