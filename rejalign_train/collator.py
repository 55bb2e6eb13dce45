"""Batch rendered conversations into model inputs with assistant-only labels.

The processor itself tokenises the rendered text and expands each image placeholder into image
tokens, exactly as at inference time. Labels come from character spans, not token ids: a token is
trained when it overlaps an assistant span (shifted past the image tokens the processor inserted
before it). So prompt, system text, image tokens and padding are never trained, and padding is
told apart by the attention mask, not by the pad id: when pad == eos, every EOS a reply ends
with is still trained (transformers #23530).

``refusal_eos="mask"`` reproduces the paper's "train without EOS" (upstream
``train_without_eos.py``): for a refusal sample the label of the end-of-turn token that closes its
last assistant turn is ignored; the token stays in the input. The model learns to *start* with
the refusal, not to stop after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from rejalign_train.dataset import Sample, add_special_tokens_for

IGNORE_INDEX = -100
REFUSAL_EOS_CHOICES = ("train", "mask")


def load_rgb(path: str) -> Image.Image:
    """Decode one image as RGB (what every VLM image processor expects)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def _shift(char: int, ends: np.ndarray, gained: np.ndarray) -> int:
    """Map a character offset of the rendered text into the processor's expanded text."""
    return char + int(gained[np.searchsorted(ends, char, side="right")])


class VisionChatCollator:
    """``collate_fn`` for :class:`~rejalign_train.dataset.Sample` batches (right padding)."""

    def __init__(
        self,
        processor,
        *,
        refusal_eos: str = "mask",
        max_length: int | None = None,
        image_loader: Callable[[str], Image.Image] = load_rgb,
    ):
        if refusal_eos not in REFUSAL_EOS_CHOICES:
            raise ValueError(
                f"refusal_eos={refusal_eos!r}: expected one of {', '.join(REFUSAL_EOS_CHOICES)}"
            )
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.refusal_eos = refusal_eos
        self.max_length = max_length
        self.image_loader = image_loader
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(self.tokenizer, "image_token_id", None)
        self.image_token_id = image_token_id

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        texts = [s.text for s in samples]
        images = [[self.image_loader(p) for p in s.images] for s in samples]
        has_images = any(images)
        enc = self.processor(
            text=texts,
            images=images if has_images else None,
            padding="longest",
            padding_side="right",
            truncation=False,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            add_special_tokens=add_special_tokens_for(self.tokenizer, texts[0]),
        )
        # Python objects first, tensors after: some processors (Idefics3) convert every output
        # to tensors, the per-image replacement records included, and fail whenever the first
        # row has no image ("Unable to convert output 'text_replacement_offsets'").
        offsets = np.asarray(enc.pop("offset_mapping"), dtype=np.int64).reshape(len(texts), -1, 2)
        replacements = enc.pop("text_replacement_offsets", None)
        skip = set(getattr(self.processor, "skip_tensor_conversion", None) or ())
        as_is = {k: v for k, v in enc.items() if k in skip}
        tensors = BatchFeature({k: v for k, v in enc.items() if k not in skip}, tensor_type="pt")
        enc = {**tensors, **as_is}
        if has_images and not replacements:
            raise RuntimeError(
                f"{type(self.processor).__name__} does not report where it expands image "
                "placeholders (return_text_replacement_offsets), so labels cannot be aligned"
            )
        input_ids = enc["input_ids"]
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            raise RuntimeError(
                f"a batch is {input_ids.shape[1]} tokens long, over max_length {self.max_length}; "
                "over-long samples must be filtered before training (never truncated)"
            )
        keep = np.zeros(input_ids.shape, dtype=bool)
        drop = np.zeros(input_ids.shape, dtype=bool)
        starts, ends = offsets[..., 0], offsets[..., 1]
        for row, sample in enumerate(samples):
            repl = replacements[row] if replacements else []
            placeholder_ends = np.array([r["span"][1] for r in repl], dtype=np.int64)
            gained = np.array([0] + [r["new_span"][1] - r["span"][1] for r in repl], dtype=np.int64)
            s, e = starts[row], ends[row]
            real = e > s  # zero-width: padding and special tokens added by the tokenizer
            for lo, hi in sample.spans:
                lo, hi = _shift(lo, placeholder_ends, gained), _shift(hi, placeholder_ends, gained)
                keep[row] |= real & (s < hi) & (e > lo)
            if sample.refusal and self.refusal_eos == "mask":
                lo, hi = (_shift(c, placeholder_ends, gained) for c in sample.eot_spans[-1])
                eot = real & (s < hi) & (e > lo)
                if not eot.any():
                    raise RuntimeError(f"sample {sample.id!r}: its end-of-turn token was not found")
                drop[row] |= eot
        keep &= ~drop
        keep &= enc["attention_mask"].numpy().astype(bool)
        labels = torch.where(torch.from_numpy(keep), input_ids, IGNORE_INDEX)
        if self.image_token_id is not None:
            labels[input_ids == self.image_token_id] = IGNORE_INDEX
        enc["labels"] = labels
        return enc
