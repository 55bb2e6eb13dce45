"""The two engines that run a judge model: vLLM (every prompt in one ``LLM.generate``) and
transformers (batched ``generate``), giving the same greedy outputs.

Both take a list of :class:`JudgeInput` (the exact prompt text a judge's ``build_prompt`` made,
and the attack image for a vision judge) and return, per input, the generated text (greedy,
``spec.max_new_tokens``) and, for a judge with ``first_token_scores`` (StrongREJECT), the
probabilities of those candidate tokens at the first generated position. The probabilities are
over the whole vocabulary (softmax of the raw logits); the judge's parser renormalises them over
the candidates, as upstream's ``logits[:, ids].softmax(-1)`` does.

Tokenisation is decided once, here, for both engines, by the judge's ``add_special_tokens``
(False for the Llama Guards, whose chat templates write ``<|begin_of_text|>`` themselves; True
for HarmBench, WildGuard and StrongREJECT, whose upstream callers let the tokenizer add the BOS).
Text judges hand vLLM the token ids themselves, so the two engines read identical tokens. Vision
prompts go through the model's processor in both engines (vLLM applies the same HF processor),
with the same choice of special tokens.

vLLM is imported only when the vLLM engine is built: ``--help`` and the transformers engine need
none of it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rejalign_tasks.console import CommandFailed, UsageError

if TYPE_CHECKING:
    from PIL import Image

    from rejalign_tasks.judge.judges import JudgeSpec

log = logging.getLogger(__name__)

ENGINES = ("vllm", "hf")


@dataclass(frozen=True)
class JudgeInput:
    """One prompt for the judge model: the exact text, and the image a vision judge sees."""

    prompt: str
    image: Image.Image | None = None


@dataclass(frozen=True)
class Generation:
    """The judge model's greedy output for one input."""

    text: str
    first_token_probs: dict[str, float] | None = None


def check_engine(spec: JudgeSpec, engine: str) -> None:
    """Stop at once, before any model is loaded, when the judge cannot run on ``engine``
    (Llama Guard 3 Vision on vLLM: Mllama is gone from vLLM after 0.10.2)."""
    try:
        spec.check_engine(engine)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _model_path(model: str) -> str:
    """A local folder as an absolute path; a Hub id as it is (offline mode is honoured by the
    libraries themselves: nothing is sent anywhere but the Hub a Hub id names)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def resolve_model(spec: JudgeSpec, model: str, adapter: str | None) -> tuple[str, str | None]:
    """(base model, LoRA adapter or None) for ``--judge-model`` and ``--adapter``.

    A ``--judge-model`` folder holding ``adapter_config.json`` is a PEFT adapter (as StrongREJECT's
    published ``qylu4156/strongreject-15k-v1`` is): its base is the one the adapter names. A
    judge published as base + LoRA otherwise gets its published adapter unless ``--adapter``
    names another.
    """
    import json

    folder = Path(model).expanduser()
    config = folder / "adapter_config.json"
    if config.is_file():
        try:
            base = json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"]
        except (ValueError, KeyError) as exc:
            raise UsageError(f"{config}: no readable base_model_name_or_path ({exc})") from exc
        if adapter:
            raise UsageError(
                f"--judge-model {model} is itself a LoRA adapter; do not also give --adapter"
            )
        return _model_path(str(base)), str(folder.resolve())
    if adapter:
        return _model_path(model), _model_path(adapter)
    return _model_path(model), spec.lora_adapter


def encode(spec: JudgeSpec, tokenizer: Any, prompt: str) -> list[int]:
    """The token ids both engines feed the judge model for a text prompt."""
    return list(tokenizer(prompt, add_special_tokens=spec.add_special_tokens)["input_ids"])


def candidate_ids(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Vocabulary ids of StrongREJECT's candidate score tokens (upstream:
    ``judge_tokenizer.vocab[i]``); a token missing from the vocabulary is an error."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise CommandFailed(
            f"the judge tokenizer has no token {', '.join(map(repr, missing))} in its "
            "vocabulary; it cannot score this judge's first token"
        )
    return [vocab[t] for t in tokens]


class Engine:
    """What both engines share: the judge spec, the tokenizer (or processor) its prompts need."""

    name = ""

    def __init__(self, spec: JudgeSpec) -> None:
        self.spec = spec

    @property
    def prompt_tokenizer(self) -> Any:
        """What ``spec.build_prompt`` receives: the processor for a vision judge (it owns the
        chat template with the image placeholder), the tokenizer otherwise."""
        raise NotImplementedError

    def generate(self, inputs: Sequence[JudgeInput]) -> list[Generation]:
        raise NotImplementedError


class HFEngine(Engine):
    """transformers: ``AutoModelForCausalLM`` (text judges) or ``AutoModelForImageTextToText`` +
    ``AutoProcessor`` (vision judges), peft for a LoRA adapter; left-padded batches, greedy."""

    name = "hf"

    def __init__(
        self,
        spec: JudgeSpec,
        model: str,
        *,
        adapter: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 8,
    ) -> None:
        super().__init__(spec)
        import torch
        import transformers

        self.torch = torch
        self.batch_size = max(1, int(batch_size))
        self.device = device
        path, lora = resolve_model(spec, model, adapter)
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        try:
            if spec.vision:
                self.processor = transformers.AutoProcessor.from_pretrained(path)
                self.tokenizer = self.processor.tokenizer
                self.model = transformers.AutoModelForImageTextToText.from_pretrained(
                    path, dtype=torch_dtype
                )
            else:
                self.processor = None
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    path, dtype=torch_dtype
                )
        except OSError as exc:
            raise UsageError(f"--judge-model {model}: cannot load the judge model ({exc})") from exc
        if lora is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, lora)
        self.model.to(device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.candidates = (
            candidate_ids(self.tokenizer, spec.first_token_scores)
            if spec.first_token_scores
            else []
        )

    @property
    def prompt_tokenizer(self) -> Any:
        return self.processor if self.spec.vision else self.tokenizer

    def _batch(self, inputs: Sequence[JudgeInput]) -> dict:
        torch = self.torch
        if self.spec.vision:
            images = [[i.image] if i.image is not None else None for i in inputs]
            if any(im is None for im in images):
                raise CommandFailed(f"judge {self.spec.name!r} needs an image for every prompt")
            return self.processor(
                text=[i.prompt for i in inputs],
                images=images,
                padding=True,
                add_special_tokens=self.spec.add_special_tokens,
                return_tensors="pt",
            )
        ids = [encode(self.spec, self.tokenizer, i.prompt) for i in inputs]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        return {"input_ids": input_ids, "attention_mask": mask}

    def generate(self, inputs: Sequence[JudgeInput]) -> list[Generation]:
        torch = self.torch
        out: list[Generation] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            batch = {
                # pixel values in the model's dtype (Llama 4's processor gives bfloat16)
                k: v.to(self.device, dtype=self.model.dtype) if v.is_floating_point() else
                v.to(self.device)
                for k, v in self._batch(chunk).items()
            }
            with torch.inference_mode():
                result = self.model.generate(
                    **batch,
                    max_new_tokens=self.spec.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=self.tokenizer.pad_token_id,
                    return_dict_in_generate=True,
                    output_logits=bool(self.candidates),
                )
            width = batch["input_ids"].shape[1]
            new = result.sequences[:, width:]
            first = None
            if self.candidates:
                # Raw logits of the first generated position (upstream scores the logits of one
                # forward pass over the prompt: the same numbers).
                first = torch.log_softmax(result.logits[0].float(), dim=-1)
            for row in range(len(chunk)):
                text = self.tokenizer.decode(new[row], skip_special_tokens=True)
                probs = None
                if first is not None:
                    probs = {
                        tok: float(first[row, tid].exp())
                        for tok, tid in zip(
                            self.spec.first_token_scores, self.candidates, strict=True
                        )
                    }
                out.append(Generation(text, probs))
        return out


class VLLMEngine(Engine):
    """vLLM: one ``LLM.generate`` over every prompt (the engine batches them), greedy; images as
    ``multi_modal_data``; StrongREJECT's adapter through ``LoRARequest``; candidate-token
    probabilities through ``SamplingParams(logprob_token_ids=...)``."""

    name = "vllm"

    def __init__(
        self,
        spec: JudgeSpec,
        model: str,
        *,
        adapter: str | None = None,
        dtype: str = "auto",
        vllm_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(spec)
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as exc:
            raise UsageError(
                "--engine vllm needs vLLM in this environment (pip install 'rejalign[vllm]'); "
                "or use --engine hf"
            ) from exc
        self.vllm = vllm
        path, self.lora = resolve_model(spec, model, adapter)
        if self.lora is not None and not Path(self.lora).is_dir():
            # a Hub adapter (StrongREJECT's published one): a local snapshot, so that its rank
            # can be read and vLLM gets a folder (HF_HUB_OFFLINE uses the cache only)
            from huggingface_hub import snapshot_download

            self.lora = snapshot_download(self.lora)
        kwargs: dict[str, Any] = {"model": path, "dtype": dtype, "seed": 0}
        if self.lora is not None:
            kwargs.update(enable_lora=True, max_lora_rank=_lora_rank(self.lora), max_loras=1)
        if spec.vision:
            kwargs["limit_mm_per_prompt"] = {"image": 1}
        kwargs.update(vllm_args or {})
        try:
            self.llm = vllm.LLM(**kwargs)
        except OSError as exc:
            raise UsageError(f"--judge-model {model}: cannot load the judge model ({exc})") from exc
        self.tokenizer = self.llm.get_tokenizer()
        self.lora_request = LoRARequest("judge-adapter", 1, self.lora) if self.lora else None
        self.candidates = (
            candidate_ids(self.tokenizer, spec.first_token_scores)
            if spec.first_token_scores
            else []
        )
        self._processor = None

    @property
    def prompt_tokenizer(self) -> Any:
        if not self.spec.vision:
            return self.tokenizer
        if self._processor is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.llm.llm_engine.model_config.model)
        return self._processor

    def generate(self, inputs: Sequence[JudgeInput]) -> list[Generation]:
        if not inputs:
            return []
        params = self.vllm.SamplingParams(
            temperature=0.0,
            max_tokens=self.spec.max_new_tokens,
            logprob_token_ids=self.candidates or None,
        )
        tokenization_kwargs = None
        if self.spec.vision:
            if any(i.image is None for i in inputs):
                raise CommandFailed(f"judge {self.spec.name!r} needs an image for every prompt")
            prompts: list[Any] = [
                {"prompt": i.prompt, "multi_modal_data": {"image": i.image}} for i in inputs
            ]
            tokenization_kwargs = {"add_special_tokens": self.spec.add_special_tokens}
        else:
            prompts = [
                {"prompt_token_ids": encode(self.spec, self.tokenizer, i.prompt)} for i in inputs
            ]
        outputs = self.llm.generate(
            prompts,
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
            tokenization_kwargs=tokenization_kwargs,
        )
        result = []
        for output in outputs:
            completion = output.outputs[0]
            text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            probs = None
            if self.candidates:
                first = completion.logprobs[0]
                probs = {}
                for tok, tid in zip(self.spec.first_token_scores, self.candidates, strict=True):
                    if tid not in first:
                        raise CommandFailed(f"vLLM returned no logprob for candidate {tok!r}")
                    probs[tok] = float(_exp(first[tid].logprob))
            result.append(Generation(text, probs))
        return result


def _exp(x: float) -> float:
    import math

    return math.exp(x) if x != float("-inf") else 0.0


def _lora_rank(adapter: str) -> int:
    """The adapter's rank rounded up to one vLLM accepts."""
    import json

    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        raise UsageError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    data = json.loads(config.read_text(encoding="utf-8"))
    rank = max([int(data.get("r") or 8), *map(int, (data.get("rank_pattern") or {}).values())])
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    return rank


def load_engine(
    spec: JudgeSpec,
    model: str,
    engine: str,
    *,
    adapter: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 8,
    vllm_args: dict[str, Any] | None = None,
) -> Engine:
    """Build the engine (checked first: a judge that cannot run on it fails before loading)."""
    check_engine(spec, engine)
    log.info("rejalign-judge: loading %s on %s", model, engine)
    if engine == "hf":
        return HFEngine(
            spec, model, adapter=adapter, device=device, dtype=dtype, batch_size=batch_size
        )
    return VLLMEngine(spec, model, adapter=adapter, dtype=dtype, vllm_args=vllm_args)
