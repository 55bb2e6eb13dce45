"""What a judge reads and what it says: :class:`JudgeItem` and :class:`JudgeLabel`.

A module of their own so that the prompt builders and parsers can name them without importing
the registry (:mod:`rejalign_tasks.judge.judges` re-exports both). Standard library only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class JudgeItem:
    """One logged sample as a judge sees it.

    ``request`` is the harmful request in words, the behaviour judged against (FigStep: the
    SafeBench ``question``; MM-SafetyBench: its original question; XSTest: the prompt);
    ``response`` the model's completion. The vision judges also get ``image``, the attack image
    the model saw, and ``prompt_sent``, the text prompt that accompanied it.
    """

    request: str
    response: str
    image: Any = None  # PIL.Image.Image | None
    prompt_sent: str | None = None


@dataclass(frozen=True)
class JudgeLabel:
    """A judge's verdict on one item.

    ``label`` is the judge's own word ("safe"/"unsafe", "yes"/"no", WildGuard's triple, a score,
    or "unparsed"); ``attack_success`` is None when unparsed (never a silent default);
    ``refusal`` None when the judge has no refusal notion or the output is unparsed; ``score`` is
    StrongREJECT's score in [0, 1]; ``categories`` e.g. Llama Guard's S-codes; ``raw`` the judge
    model's raw output.
    """

    label: str
    attack_success: bool | None
    refusal: bool | None
    score: float | None = None
    categories: tuple[str, ...] = ()
    raw: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (categories as a list), for the judged sample log."""
        out = asdict(self)
        out["categories"] = list(self.categories)
        return out
