"""Helper of tests/test_qwen2vl.py, run with the vLLM environment's interpreter.

transformers builds Qwen2-VL's processors only with torchvision, which the main environment
lacks; the vLLM environment has a torchvision that matches its torch. Each command prints one
JSON object on its last line of stdout; the test asserts on it.

    python tests/qwen2vl_probe.py build OUT_ROOT TOKENIZER_DIR
    python tests/qwen2vl_probe.py labels DATA_JSONL MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build(out_root: str, tokenizer_dir: str) -> dict:
    """One tiny random model per Qwen family, under OUT_ROOT/FAMILY."""
    from rejalign_train.tiny import QWEN_FAMILIES, build_tiny_qwen2_vl

    return {
        family: str(
            build_tiny_qwen2_vl(
                Path(out_root) / family, tokenizer_dir, family=family, whole_characters=True
            )
        )
        for family in QWEN_FAMILIES
    }


def labels(data: str, *model_dirs: str) -> dict:
    """For each model, the trainer's samples and collated labels of DATA's records."""
    return {model_dir: _labels(model_dir, data) for model_dir in model_dirs}


def _labels(model_dir: str, data: str) -> dict:
    """The samples and collated labels of DATA's records, as ``fit`` makes them."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rejalign_train.chat import ChatRenderer
    from rejalign_train.collator import IGNORE_INDEX, VisionChatCollator
    from rejalign_train.dataset import prepare_samples
    from rejalign_train.fit import end_of_turn_tokens
    from rejalign_train.mixing import REFUSAL_SENTENCE
    from rejalign_train.model_setup import lora_target_modules, projector_path
    from rejalign_train.records import iter_records

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    eots = end_of_turn_tokens(processor, model_dir, False)
    samples, _ = prepare_samples(
        iter_records(data),
        processor,
        ChatRenderer(processor, eots),
        source=data,
        image_root=Path(data).parent,
        max_length=1024,
        refusal_sentence=REFUSAL_SENTENCE,
        progress=False,
    )
    out: dict = {
        "processor": type(processor).__name__,
        "end_of_turn_tokens": eots,
        "lora_targets": lora_target_modules(model),
        "projector": projector_path(model),
        "samples": [
            {"id": s.id, "refusal": s.refusal, "num_tokens": s.num_tokens, "text": s.text}
            for s in samples
        ],
    }
    for mode in ("mask", "train"):
        batch = VisionChatCollator(processor, refusal_eos=mode)(samples)
        out[mode] = {
            "attention": batch["attention_mask"].sum(dim=1).tolist(),
            "image_tokens": (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist(),
            "kept": [row[row != IGNORE_INDEX].tolist() for row in batch["labels"]],
        }
        with torch.no_grad():
            out[mode]["loss"] = float(model(**batch).loss)
    return out


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    result = {"build": build, "labels": labels}[command](*args)
    print(json.dumps(result))
