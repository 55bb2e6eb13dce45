"""The model side of ``rejalign-train fit``: which modules get LoRA, which train in full, and how
the model is spread over processes (FSDP's wrap classes, DeepSpeed's process group).

Kept apart from :mod:`rejalign_train.fit` (the run: folders, Trainer, adapter files) because it
is what changes with each model family.
"""

from __future__ import annotations

import logging
import os
import re

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, Trainer

from rejalign_train.config import FitArguments, ModelArguments

logger = logging.getLogger("rejalign_train.fit")

PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector", "projector")


class FitError(RuntimeError):
    """fit cannot start or finish as asked; the message says what to do."""


# --------------------------------------------------------------------------- model surgery


def language_model_path(model: nn.Module) -> str:
    """Qualified name of the language model inside a VLM (``model.language_model`` for LLaVA)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        raise FitError(f"{type(model).__name__}: cannot find its language model (get_decoder)")
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise FitError(f"{type(model).__name__}: its language model is not one of its modules")


def lora_target_modules(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Qualified names of the language model's linear layers to adapt.

    Only layers inside the language model qualify: never the vision tower (whose attention
    layers share names such as ``q_proj``) and never ``lm_head``.
    """
    prefix = language_model_path(model) + "."
    found = [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix) and isinstance(module, nn.Linear)
    ]
    if names:
        wanted = set(names)
        chosen = [n for n in found if n.rsplit(".", 1)[-1] in wanted]
        missing = wanted - {n.rsplit(".", 1)[-1] for n in chosen}
        if missing:
            available = sorted({n.rsplit(".", 1)[-1] for n in found})
            raise FitError(
                f"--lora-target-modules {' '.join(sorted(missing))}: not linear layers of the "
                f"language model (it has {', '.join(available)})"
            )
        found = chosen
    if not found:
        raise FitError(f"{type(model).__name__}: no linear layer in its language model")
    return found


def lora_target_regex(modules: list[str]) -> str:
    """A compact ``re.fullmatch`` pattern for peft, equal to the explicit module list."""
    prefix = os.path.commonprefix(modules).rsplit(".", 1)[0]
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    pattern = rf"{re.escape(prefix)}\..*\.(?:{'|'.join(map(re.escape, leaves))})"
    if [m for m in modules if not re.fullmatch(pattern, m)]:
        return "|".join(map(re.escape, modules))
    return pattern


def projector_path(model: nn.Module) -> str:
    """Qualified name of the vision-language projector."""
    lm = language_model_path(model)
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in PROJECTOR_NAMES and not name.startswith(lm + "."):
            return name
    raise FitError(
        f"{type(model).__name__}: no projector module found (looked for "
        f"{', '.join(PROJECTOR_NAMES)}); pass --train-projector false"
    )


def resolve_dtype(model_args: ModelArguments, train_args: FitArguments) -> torch.dtype:
    if model_args.dtype == "auto":
        return torch.bfloat16 if train_args.bf16 else torch.float32
    try:
        dtype = getattr(torch, model_args.dtype)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise FitError(f"--dtype {model_args.dtype}: not a torch dtype")
    return dtype


def load_model(model_args: ModelArguments, dtype: torch.dtype):
    kwargs = {"dtype": dtype, "trust_remote_code": model_args.trust_remote_code}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return AutoModelForImageTextToText.from_pretrained(model_args.model, **kwargs)


def add_lora(model: nn.Module, model_args: ModelArguments) -> tuple[nn.Module, dict]:
    """Wrap ``model`` with LoRA on the language model (and a trainable projector copy)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, model_args.lora_target_modules)
    modules_to_save = [projector_path(model)] if model_args.train_projector else None
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=lora_target_regex(targets),
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for param in model.parameters():  # trainable weights in fp32: AdamW on bf16 weights stalls
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA r=%d on %d linear layers of the language model; projector %s; %d of %d "
        "parameters trainable",
        model_args.lora_r,
        len(targets),
        modules_to_save[0] if modules_to_save else "frozen",
        trainable,
        total,
    )
    info = {
        "target_modules": targets,
        "modules_to_save": modules_to_save or [],
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    return model, info


def fsdp_layer_classes(model: nn.Module) -> list[str]:
    """Class names of the repeated blocks FSDP should wrap (shard) one by one.

    transformers' and peft's default is the model's ``_no_split_modules``, which for a VLM names
    classes it does not have (LLaVA's lists ``CLIPTextEmbeddings``; its CLIP is vision-only), and
    FSDP's auto-wrap then refuses to start. Only the classes the model really has are kept; a
    model without ``_no_split_modules`` gets its language model's decoder layer class.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    present = {type(m).__name__ for m in model.modules()}
    names = sorted(n for n in (getattr(base, "_no_split_modules", None) or ()) if n in present)
    if not names:
        decoder = base.get_submodule(language_model_path(base))
        layers = getattr(decoder, "layers", None)
        if not layers:
            raise FitError(
                f"{type(base).__name__}: cannot tell which layers FSDP should wrap; name them with "
                '--fsdp_config \'{"transformer_layer_cls_to_wrap": ["..."]}\''
            )
        names = [type(layers[0]).__name__]
    return names


def configure_fsdp(model: nn.Module, train_args: FitArguments) -> None:
    """Make ``--fsdp``/``--fsdp_config`` work for a LoRA-wrapped VLM (no-op without FSDP).

    * transformer auto-wrap gets the model's real block classes (see :func:`fsdp_layer_classes`)
      unless ``--fsdp_config`` names them; peft's own FSDP1 policy for LoRA (each trainable
      LoRA/projector layer in its own unit, so frozen and trainable weights never share a flat
      parameter) reads them from ``FSDP_TRANSFORMER_CLS_TO_WRAP``, which is set to the same list.
    """
    plugin = getattr(train_args, "fsdp_plugin_args", None)
    if not plugin:
        return
    config = train_args.fsdp_config if isinstance(train_args.fsdp_config, dict) else {}
    if plugin.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP") == "TRANSFORMER_BASED_WRAP":
        names = plugin.get("transformer_cls_names_to_wrap")
        if not names:
            names = ",".join(fsdp_layer_classes(model))
            plugin["transformer_cls_names_to_wrap"] = names
            config["transformer_layer_cls_to_wrap"] = names.split(",")
        os.environ.setdefault("FSDP_TRANSFORMER_CLS_TO_WRAP", names)
    logger.info(
        "FSDP%s: wrapping %s",
        plugin.get("fsdp_version", 2),
        plugin.get("transformer_cls_names_to_wrap"),
    )



def distributed_setup(trainer: Trainer) -> dict:
    """How the run is spread over processes, for the manifest and the log."""
    acc_state = trainer.accelerator.state
    kind = getattr(acc_state.distributed_type, "value", str(acc_state.distributed_type))
    setup: dict = {"type": kind, "backend": getattr(acc_state, "backend", None)}
    if getattr(trainer, "is_deepspeed_enabled", False):
        setup["zero_stage"] = acc_state.deepspeed_plugin.zero_stage
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = acc_state.fsdp_plugin
        setup["fsdp_version"] = getattr(plugin, "fsdp_version", 1)
        setup["state_dict_type"] = str(plugin.state_dict_type).rsplit(".", 1)[-1]
    return setup



def init_deepspeed_comm() -> None:
    """Let DeepSpeed see the process group before the model loads.

    Under ZeRO-3 ``from_pretrained`` partitions the weights as it loads them
    (``deepspeed.zero.Init``), and DeepSpeed sizes its batch from its own communication layer: when
    accelerate started the process group itself (on CPUs, over gloo) that layer still reports a
    world of 1 and the batch-size check fails ("train_batch_size is not equal to
    micro_batch_per_gpu * gradient_acc_step * world_size 8 != 4 * 1 * 1"). It adopts the existing
    group here.
    """
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(auto_mpi_discovery=False)


