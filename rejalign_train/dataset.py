"""Turn normalised training records into samples the collator can batch, checking them first.

All checks run before the first training step, so a bad record stops the run in seconds, not
hours in: a missing or unreadable image, a conversation with no assistant turn, an ``<image>``
count that differs from the record's images. Each sample's exact token count (text plus the image
tokens the processor will insert) is computed here without decoding any image: the expansion of
an image placeholder depends only on the image size, so it is measured once per distinct size.
Over-long samples are skipped (counted and logged) or rejected; they are never truncated, because
a cut through image tokens breaks the model ("Image features and image tokens do not match").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from rejalign_train.chat import IMAGE_PLACEHOLDER, ChatRenderer, to_chat_messages
from rejalign_train.records import RecordError

logger = logging.getLogger(__name__)

OVERLONG_CHOICES = ("skip", "error")


@dataclass(frozen=True)
class Sample:
    """One rendered conversation, ready for the collator."""

    id: str
    text: str
    spans: tuple[tuple[int, int], ...]
    eot_spans: tuple[tuple[int, int], ...]
    images: tuple[str, ...]
    refusal: bool
    num_tokens: int


@dataclass
class PrepareStats:
    """What preparation found; it goes into the output manifest."""

    records: int = 0
    used: int = 0
    refusal_samples: int = 0
    images: int = 0
    skipped_overlong: int = 0
    skipped_ids: list[str] = field(default_factory=list)  # the first few, for the log
    max_tokens: int = 0


class SampleDataset(Dataset):
    """A list of :class:`Sample` as a map-style dataset for the Trainer's DataLoader."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def image_token_string(processor) -> str | None:
    """The placeholder the processor expands into image tokens (``<image>``, ``<|image_pad|>``)."""
    return getattr(processor, "image_token", None) or getattr(
        getattr(processor, "tokenizer", None), "image_token", None
    )


def add_special_tokens_for(tokenizer, text: str) -> bool:
    """Whether to let the tokenizer add its special tokens, as ``apply_chat_template`` decides:
    not when the template already wrote the BOS token (else it would appear twice)."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


class ImageTokenCounter:
    """A sample's exact token count, image tokens included, without decoding any image.

    The processor replaces each image placeholder with a string that depends only on the image's
    size, then tokenises the whole text. That string is measured once per size (on a blank
    image); a sample is counted by making the same replacements in its text and tokenising it
    whole. Counting a per-image constant instead would be wrong wherever the expansion merges
    with its context: Gemma 3's expansion starts with two newlines, which merge with a newline
    before the placeholder into one token.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.placeholder = image_token_string(processor)
        self._cache: dict[tuple[int, int], str] = {}

    def replacement(self, size: tuple[int, int]) -> str:
        """The text the processor puts in place of the placeholder for an image of ``size``."""
        if size not in self._cache:
            blank = Image.new("RGB", size, (255, 255, 255))
            enc = self.processor(
                text=[self.placeholder], images=[[blank]], return_text_replacement_offsets=True
            )
            found = (enc.get("text_replacement_offsets") or [[]])[0]
            if len(found) != 1 or "replacement" not in found[0]:
                raise RuntimeError(
                    f"{type(self.processor).__name__} does not report how it expands image "
                    "placeholders (return_text_replacement_offsets), so image tokens cannot be "
                    "counted nor labels aligned"
                )
            self._cache[size] = found[0]["replacement"]
        return self._cache[size]

    def count(self, text: str, sizes: list[tuple[int, int]]) -> int:
        """Tokens of ``text`` once the processor has expanded its placeholders (images of
        ``sizes``, in order), with the special tokens the collator lets the tokenizer add."""
        add_special = add_special_tokens_for(self.tokenizer, text)  # decided as the collator does
        if self.placeholder:
            pieces = text.split(self.placeholder)
            if len(pieces) - 1 != len(sizes):
                raise ValueError(
                    f"the rendered text has {len(pieces) - 1} {self.placeholder!r} "
                    f"placeholder(s) for {len(sizes)} image(s)"
                )
            text = pieces[0] + "".join(
                self.replacement(size) + piece
                for size, piece in zip(sizes, pieces[1:], strict=True)
            )
        elif sizes:
            raise ValueError(f"{type(self.processor).__name__} has no image placeholder")
        return len(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])


def resolve_image(path: str, image_root: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and image_root is not None:
        p = image_root / p
    return p


def _image_size(path: Path, error) -> tuple[int, int]:
    if not path.is_file():
        raise error(f"image file {path} not found", "images")
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise error(f"cannot read image {path} ({exc})", "images") from exc


def prepare_samples(
    records: Iterable[dict],
    processor,
    renderer: ChatRenderer,
    *,
    source: str,
    image_root: str | os.PathLike | None,
    max_length: int,
    overlong: str = "skip",
    refusal_sentence: str,
    progress: bool = True,
) -> tuple[list[Sample], PrepareStats]:
    """Check, render and measure every record; return the usable samples and the statistics.

    ``records`` are normalised records (``id``, ``images``, ``messages`` with ``<image>``
    placeholders in user text). A sample is a refusal sample when any of its messages contains
    ``refusal_sentence`` (the upstream rule in ``train_without_eos.py``).
    """
    if overlong not in OVERLONG_CHOICES:
        raise ValueError(f"overlong={overlong!r}: expected one of {', '.join(OVERLONG_CHOICES)}")
    root = Path(image_root).expanduser() if image_root else None
    counter = ImageTokenCounter(processor)
    stats = PrepareStats()
    samples: list[Sample] = []
    for index, record in enumerate(tqdm(records, desc="Preparing data", disable=not progress)):
        stats.records += 1
        rid = str(record.get("id", index))

        def error(message: str, field: str | None = None, index=index, rid=rid) -> RecordError:
            return RecordError(source, message, index=index, record_id=rid, field=field)

        messages = record.get("messages") or []
        if not any(m.get("role") == "assistant" for m in messages):
            raise error("no assistant turn: nothing to learn from this record", "messages")
        images = list(record.get("images") or [])
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders != len(images):
            raise error(
                f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the user text but "
                f"{len(images)} image(s)",
                "images",
            )
        paths = [resolve_image(p, root) for p in images]
        sizes = [_image_size(p, error) for p in paths]
        try:
            rendered = renderer.render(to_chat_messages(messages))
        except ValueError as exc:
            raise error(str(exc), "messages") from exc
        try:
            num_tokens = counter.count(rendered.text, sizes)
        except ValueError as exc:
            raise error(str(exc), "images") from exc
        if num_tokens > max_length:
            if overlong == "error":
                raise error(
                    f"{num_tokens} tokens (image tokens included) exceed max_length {max_length}; "
                    "raise --max-length or pass --overlong skip to leave such samples out"
                )
            stats.skipped_overlong += 1
            if len(stats.skipped_ids) < 20:
                stats.skipped_ids.append(rid)
            continue
        refusal = any(refusal_sentence in m["content"] for m in messages)
        samples.append(
            Sample(
                id=rid,
                text=rendered.text,
                spans=rendered.spans,
                eot_spans=rendered.eot_spans,
                images=tuple(str(p) for p in paths),
                refusal=refusal,
                num_tokens=num_tokens,
            )
        )
        stats.used += 1
        stats.refusal_samples += refusal
        stats.images += len(paths)
        stats.max_tokens = max(stats.max_tokens, num_tokens)
    if stats.records == 0:
        raise RecordError(source, "no records (empty data)")
    if stats.skipped_overlong:
        logger.warning(
            "skipped %d of %d record(s) longer than max_length %d tokens (first ids: %s)",
            stats.skipped_overlong,
            stats.records,
            max_length,
            ", ".join(stats.skipped_ids),
        )
    if not samples:
        raise RecordError(
            source,
            f"all {stats.records} record(s) exceed max_length {max_length}; nothing to train on",
        )
    logger.info(
        "prepared %d sample(s) from %s: %d refusal, %d image(s), longest %d tokens",
        stats.used,
        source,
        stats.refusal_samples,
        stats.images,
        stats.max_tokens,
    )
    return samples, stats
