"""Render a training record with the processor's chat template and locate the assistant text.

The loss must fall on assistant tokens only: exactly what the model has to generate after the
generation prompt at inference time. Each assistant span is therefore found by rendering the
conversation up to that turn with the generation prompt and taking what the full rendering adds
after it (upstream LLaVA masks the same way: everything through "ASSISTANT:" is ignored). That
needs a template that renders a conversation's prefix as a prefix of its text, which is checked;
where that fails, the template's ``{% generation %}`` marks (the Hugging Face convention) give the
spans instead. The marks alone would miss the separator a template puts between the generation
prompt and the reply (llava-hf's "ASSISTANT:" + " " + reply), a token the model must generate.

Every span ends exactly at an end-of-turn token (``</s>``, ``<|im_end|>``, ``<end_of_utterance>``
...): whitespace the template puts after it is not trained, and a template that ends assistant
turns with no such token (llava-hf's own LLaVA-1.5 template) gets the tokenizer's EOS appended to
the reply, so that the model learns to stop and ``--refusal-eos mask`` has a token to act on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from transformers.utils.chat_template_utils import render_jinja_template

from rejalign_tasks.contracts import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered for training.

    ``spans`` are ``(start, end)`` character ranges of ``text`` whose tokens are trained, one per
    assistant turn; each ends with the end-of-turn string, whose range is ``eot_spans``.
    """

    text: str
    spans: tuple[tuple[int, int], ...]
    eot_spans: tuple[tuple[int, int], ...]


def to_chat_messages(messages: Iterable[dict]) -> list[dict]:
    """Normalised record messages -> the list-of-parts form multimodal chat templates expect.

    ``<image>`` placeholders in user text become ``{"type": "image"}`` parts in place (the text
    around them is kept, minus the line break that conventionally follows a placeholder), the same
    way lm-eval's ``hf-multimodal`` builds its prompts, so training and evaluation render alike.
    """
    out = []
    for message in messages:
        content = message["content"]
        parts: list[dict] = []
        pieces = content.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image"})
                if piece.startswith("\n"):
                    piece = piece[1:]
            if i < len(pieces) - 1 and piece.endswith("\n"):
                piece = piece[:-1]
            if piece or (len(pieces) == 1):
                parts.append({"type": "text", "text": piece})
        out.append({"role": message["role"], "content": parts})
    return out


class ChatRenderer:
    """Renders conversations with one processor's chat template and finds the trained spans."""

    def __init__(self, processor, end_of_turn_tokens: Iterable[str] = ()):
        tokenizer = getattr(processor, "tokenizer", processor)
        template = getattr(processor, "chat_template", None) or getattr(
            tokenizer, "chat_template", None
        )
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise ValueError(
                "the processor has no chat template; fit trains through the chat template the "
                "model is evaluated with (lm_eval --apply_chat_template), so one is required"
            )
        self.template = template
        self.has_generation_tags = bool(_GENERATION_TAG.search(template))
        self.eos_token: str = tokenizer.eos_token
        eots = [t for t in (self.eos_token, *end_of_turn_tokens) if t]
        # Longest first so that e.g. "<|im_end|>" wins over a shorter token it contains.
        self.end_of_turn_tokens: tuple[str, ...] = tuple(
            sorted(dict.fromkeys(eots), key=len, reverse=True)
        )
        self._template_kwargs = dict(tokenizer.special_tokens_map)
        self._warned_eos = False

    def _render(self, conversation: list[dict], *, generation_prompt: bool, spans: bool = False):
        prompts, indices = render_jinja_template(
            conversations=[conversation],
            chat_template=self.template,
            return_assistant_tokens_mask=spans,
            add_generation_prompt=generation_prompt,
            **self._template_kwargs,
        )
        return prompts[0], (indices[0] if indices else [])

    def raw_spans(self, conversation: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and each assistant turn's span (prefix rendering, else the marks)."""
        assistant_turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        text, _ = self._render(conversation, generation_prompt=False)
        spans = []
        for turn in assistant_turns:
            before, _ = self._render(conversation[:turn], generation_prompt=True)
            upto, _ = self._render(conversation[: turn + 1], generation_prompt=False)
            if not upto.startswith(before) or not text.startswith(upto):
                return self._marked_spans(conversation, len(assistant_turns))
            spans.append((len(before), len(upto)))
        return text, spans

    def _marked_spans(self, conversation: list[dict], turns: int):
        if not self.has_generation_tags:
            raise ValueError(
                "the chat template does not render a conversation's prefix as a prefix of its "
                "text and has no {% generation %} marks, so the assistant tokens cannot be located"
            )
        text, indices = self._render(conversation, generation_prompt=False, spans=True)
        spans = [tuple(s) for s in indices]
        if len(spans) != turns:
            raise ValueError(
                f"the chat template's {{% generation %}} marks gave {len(spans)} span(s) for "
                f"{turns} assistant turn(s)"
            )
        return text, spans

    def render(self, conversation: list[dict]) -> RenderedChat:
        """Render ``conversation``; trim each span to its end-of-turn token (added when absent)."""
        text, spans = self.raw_spans(conversation)
        out_spans: list[tuple[int, int]] = []
        eot_spans: list[tuple[int, int]] = []
        shift = 0  # characters inserted so far
        for start, end in spans:
            start, end = start + shift, end + shift
            segment = text[start:end].rstrip()
            stop = start + len(segment)
            eot = next((t for t in self.end_of_turn_tokens if segment.endswith(t)), None)
            if eot is None:  # a generation mark may close before the template's end-of-turn token
                rest = text[stop:]
                gap = len(rest) - len(rest.lstrip())
                follows = next(
                    (t for t in self.end_of_turn_tokens if rest[gap:].startswith(t)), None
                )
                if follows is not None:
                    eot, stop = follows, stop + gap + len(follows)
            if eot is None:
                if not self._warned_eos:
                    logger.warning(
                        "the chat template ends assistant turns with no end-of-turn token; "
                        "appending %r to every reply so that the model learns to stop",
                        self.eos_token,
                    )
                    self._warned_eos = True
                eot = self.eos_token
                text = text[:stop] + eot + text[stop:]
                shift += len(eot)
                stop += len(eot)
            out_spans.append((start, stop))
            eot_spans.append((stop - len(eot), stop))
        return RenderedChat(text, tuple(out_spans), tuple(eot_spans))
