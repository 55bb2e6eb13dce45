"""The six published model judges: what each is, how it is prompted, how its output is read.

A :class:`JudgeSpec` bundles a judge's published checkpoint, the engines that can run it, its
generation length, and two callables: ``build_prompt(item, tokenizer)`` (the exact text fed to the
judge model, from :mod:`.prompts`) and ``parse(output, first_token_probs)`` (its verdict, from
:mod:`.parsers`). Upstream sources, each pinned to a commit, are cited where the prompt or the
parser is defined. :data:`JUDGES` lists the six in ``--help`` order; :func:`get_judge` looks one
up.

Import-light: standard library only (the builders call the tokenizer they are given).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from rejalign_tasks.judge import parsers, prompts
from rejalign_tasks.judge.verdicts import JudgeItem, JudgeLabel

__all__ = ["JUDGES", "JudgeItem", "JudgeLabel", "JudgeSpec", "get_judge", "judge_names"]

ENGINES = ("vllm", "hf")


@dataclass(frozen=True)
class JudgeSpec:
    """One judge.

    ``engines`` is the subset of ("vllm", "hf") that runs it. ``max_new_tokens``: greedy
    generation length. ``first_token_scores`` (StrongREJECT): the vocabulary entries ("1".."5",
    ``tokenizer.vocab`` keys, as upstream indexes them) whose probabilities at the first generated
    position give the score; the engine passes them to ``parse`` as ``first_token_probs`` (with
    vLLM, ``allowed_token_ids`` set to those ids plus ``logprobs`` gives exactly upstream's
    softmax over the five). ``lora_adapter``: the adapter applied to ``default_model`` when the
    published judge is base + LoRA.

    ``add_special_tokens``: whether the engine lets the tokenizer add its special tokens (BOS)
    when it tokenizes the prompt text. False for the Llama Guards, whose chat templates write
    ``<|begin_of_text|>`` themselves (the model cards tokenize the rendered template without
    adding any); True for HarmBench, WildGuard and StrongREJECT, whose upstream code hands the bare
    template text to vLLM / the tokenizer, which add the BOS.

    ``variants`` names alternative prompts of the same judge (HarmBench: "llama2", the default,
    and "mistral" for the validation classifier); :func:`get_judge` picks one.
    """

    name: str
    summary: str
    default_model: str
    vision: bool
    engines: tuple[str, ...]
    max_new_tokens: int
    build_prompt: Callable[[JudgeItem, Any], str]
    parse: Callable[..., JudgeLabel]
    first_token_scores: tuple[str, ...] = ()
    lora_adapter: str | None = None
    add_special_tokens: bool = False
    variants: tuple[str, ...] = ()
    variant: str | None = None
    source: str = ""

    def supports(self, engine: str) -> bool:
        """Whether ``engine`` can run this judge."""
        return engine in self.engines

    def check_engine(self, engine: str) -> None:
        """Raise a clear error when ``engine`` cannot run this judge."""
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
        if engine not in self.engines:
            why = _ENGINE_LIMITS.get((self.name, engine), "")
            raise ValueError(
                f"judge {self.name!r} cannot run with --engine {engine}"
                f"{': ' + why if why else ''}; use --engine {' or '.join(self.engines)}"
            )


_ENGINE_LIMITS = {
    ("llama-guard-3-vision", "vllm"): (
        "it is an Mllama model, and vLLM removed Mllama after 0.10.2"
    ),
}

JUDGES: dict[str, JudgeSpec] = {
    spec.name: spec
    for spec in (
        JudgeSpec(
            name="llama-guard-3",
            summary="Llama Guard 3 (8B or 1B), text: user request + model reply -> safe/unsafe "
            "with S-codes; vllm or hf",
            default_model="meta-llama/Llama-Guard-3-8B",
            vision=False,
            engines=("vllm", "hf"),
            max_new_tokens=20,
            build_prompt=prompts.llama_guard_3_prompt,
            parse=parsers.parse_llama_guard,
            source="the checkpoint's own chat template (tokenizer_config.json of "
            "meta-llama/Llama-Guard-3-8B / -1B), applied as the model cards do",
        ),
        JudgeSpec(
            name="llama-guard-3-vision",
            summary="Llama Guard 3 Vision (11B, Mllama), sees the attack image -> safe/unsafe; "
            "hf only (vLLM removed Mllama after 0.10.2)",
            default_model="meta-llama/Llama-Guard-3-11B-Vision",
            vision=True,
            engines=("hf",),
            max_new_tokens=20,
            build_prompt=prompts.llama_guard_3_vision_prompt,
            parse=parsers.parse_llama_guard,
            source="the processor's chat template (chat_template.json of "
            "meta-llama/Llama-Guard-3-11B-Vision), applied as its model card does",
        ),
        JudgeSpec(
            name="llama-guard-4",
            summary="Llama Guard 4 (12B, Llama4ForConditionalGeneration), sees the attack image "
            "-> safe/unsafe with S-codes; vllm or hf",
            default_model="meta-llama/Llama-Guard-4-12B",
            vision=True,
            engines=("vllm", "hf"),
            max_new_tokens=20,
            build_prompt=prompts.llama_guard_4_prompt,
            parse=parsers.parse_llama_guard,
            source="the processor's chat template (chat_template.json of "
            "meta-llama/Llama-Guard-4-12B), applied as its model card does",
        ),
        JudgeSpec(
            name="harmbench",
            summary="HarmBench classifier (Llama-2-13B; --judge-variant mistral: the Mistral-7B "
            "validation classifier) -> yes/no; vllm or hf",
            default_model="cais/HarmBench-Llama-2-13b-cls",
            vision=False,
            engines=("vllm", "hf"),
            max_new_tokens=1,
            build_prompt=prompts.harmbench_prompt,
            parse=parsers.parse_harmbench,
            add_special_tokens=True,
            variants=("llama2", "mistral"),
            variant="llama2",
            source="centerforaisafety/HarmBench@8e1604d1171fe8a48d8febecd22f600e462bdcdd "
            "eval_utils.py LLAMA2_CLS_PROMPT, compute_results_classifier",
        ),
        JudgeSpec(
            name="wildguard",
            summary="WildGuard (7B): harmful request / response refusal / harmful response; "
            "vllm or hf",
            default_model="allenai/wildguard",
            vision=False,
            engines=("vllm", "hf"),
            max_new_tokens=128,
            build_prompt=prompts.wildguard_prompt,
            parse=parsers.parse_wildguard,
            add_special_tokens=True,
            source="allenai/wildguard@495b9dc837be594c6c5665b0f7f56169baf0d5be "
            "wildguard/utils.py WILDGUARD_INPUT_FORMAT, wildguard/wildguard.py "
            "parse_model_generation_to_output",
        ),
        JudgeSpec(
            name="strongreject",
            summary="StrongREJECT fine-tuned judge (Gemma-2B + LoRA): score in [0, 1] from the "
            "probabilities of 1..5; vllm (LoRA) or hf",
            default_model="google/gemma-2b",
            vision=False,
            engines=("vllm", "hf"),
            max_new_tokens=1,
            build_prompt=prompts.strongreject_prompt,
            parse=parsers.parse_strongreject,
            first_token_scores=parsers.STRONGREJECT_SCORES,
            lora_adapter="qylu4156/strongreject-15k-v1",
            add_special_tokens=True,
            source="dsbowen/strong_reject strong_reject/evaluate.py strongreject_finetuned, "
            "eval_files/judge_templates.json['strongreject_finetuned']",
        ),
    )
}

_HARMBENCH_MISTRAL = replace(
    JUDGES["harmbench"],
    default_model="cais/HarmBench-Mistral-7b-val-cls",
    build_prompt=partial(prompts.harmbench_prompt, mistral=True),
    variant="mistral",
    source="centerforaisafety/HarmBench@8e1604d1171fe8a48d8febecd22f600e462bdcdd "
    "notebooks/run_classifier_val_set.ipynb MISTRAL_CLS_PROMPT",
)


def judge_names() -> tuple[str, ...]:
    """The judge names, in ``--help`` order."""
    return tuple(JUDGES)


def get_judge(name: str, variant: str | None = None) -> JudgeSpec:
    """The judge called ``name`` (and ``variant``, where it has several prompts)."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}: one of {', '.join(JUDGES)}")
    spec = JUDGES[name]
    if variant is None or variant == spec.variant:
        return spec
    if name == "harmbench" and variant == "mistral":
        return _HARMBENCH_MISTRAL
    choices = ", ".join(spec.variants) if spec.variants else "none"
    raise ValueError(f"judge {name!r} has no variant {variant!r} (variants: {choices})")
