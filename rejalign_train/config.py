"""Configuration of ``rejalign-train fit``: dataclasses parsed by ``HfArgumentParser``.

Every field is a command-line flag (``--lora-r`` and ``--lora_r`` both work) and a key of an
optional YAML/JSON file given as the first argument; flags after the file override it. The
defaults are the paper's recipe (upstream ``scripts/v1_5/finetune_task_lora.sh``): LoRA r=128,
alpha=256, dropout 0.05 on the language model's linear layers, projector trained at 2e-5, LoRA lr
2e-4, 3 epochs, cosine schedule, warmup 3% of the steps, no weight decay, per-device batch 16 with
2 accumulation steps (x4 GPUs upstream = 128), gradient checkpointing, max length 2048, bf16 where
the hardware has it, and "train without EOS" on refusal samples.

This module stays free of ``from __future__ import annotations``: ``HfArgumentParser`` reads the
field types at run time.
"""

import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser, TrainingArguments

from rejalign_tasks.console import split_config
from rejalign_tasks.contracts import REFUSAL_SENTENCE


@dataclass
class ModelArguments:
    """The base model and its LoRA adapter."""

    model: str = field(
        metadata={
            "help": "Base VLM: a Hub id or a folder (AutoModelForImageTextToText + AutoProcessor)."
        }
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (bf16 when training in bf16, else float32), "
            "bfloat16, float16 or float32."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "e.g. sdpa, flash_attention_2, eager (default: the model's)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code."})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the language model's linear layers to adapt (e.g. q_proj "
            "v_proj); default: all of them. Never the vision tower or lm_head."
        },
    )
    train_projector: bool = field(
        default=True,
        metadata={"help": "Also train the vision-language projector (saved with the adapter)."},
    )
    projector_lr: float = field(default=2e-5, metadata={"help": "Learning rate of the projector."})


@dataclass
class DataArguments:
    """The mixed training data and how samples become token sequences."""

    data: str = field(
        metadata={
            "help": "Training data: the JSONL (or LLaVA JSON) written by `rejalign-train mix`."
        }
    )
    image_root: str | None = field(
        default=None,
        metadata={
            "help": "Folder that relative image paths are resolved against "
            "(default: the data file's folder)."
        },
    )
    max_length: int = field(
        default=2048, metadata={"help": "Longest sample, image tokens included."}
    )
    overlong: Literal["skip", "error"] = field(
        default="skip",
        metadata={
            "help": "A sample over --max-length: skip it (counted in the log) or fail. "
            "Never truncated."
        },
    )
    refusal_eos: Literal["mask", "train"] = field(
        default="mask",
        metadata={
            "help": "mask: the paper's 'train without EOS' (the final end-of-turn token of a "
            "refusal sample gets no label); train: ordinary training."
        },
    )
    refusal_sentence: str = field(
        default=REFUSAL_SENTENCE,
        metadata={"help": "A sample containing this text is a refusal sample."},
    )


@dataclass
class FitArguments(TrainingArguments):
    """``TrainingArguments`` with the paper's defaults and fit's own output options."""

    output_dir: str = field(
        metadata={
            "help": "Where the finished adapter goes. It appears only when training is "
            "complete; work in progress lives in OUTPUT_DIR.incomplete."
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue an interrupted run from its last checkpoint."},
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Also write merged full weights (base + adapter) to OUTPUT_DIR/merged."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a finished OUTPUT_DIR or discard an interrupted run."},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "LoRA learning rate."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "LR schedule."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Warmup: steps, or a fraction of all steps when < 1."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch per device."})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "Accumulation steps."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Checkpoint activations."})
    gradient_checkpointing_kwargs: dict | None = field(
        default_factory=lambda: {"use_reentrant": False},
        metadata={
            "help": "use_reentrant=False keeps LoRA gradients flowing (transformers #26221)."
        },
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: where the hardware has it."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log the loss every N steps."})
    save_steps: float = field(
        default=0.1,
        metadata={"help": "Checkpoint every N steps (a fraction of all steps when < 1)."},
    )
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the sample fields."})
    dataloader_num_workers: int = field(
        default=4, metadata={"help": "Processes that load images and collate batches."}
    )

    def __post_init__(self):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not accelerator_available():
            self.use_cpu = True  # torchrun on CPUs: DDP over gloo
        if self.bf16 is None:
            self.bf16 = not self.fp16 and bf16_available(self.use_cpu)
        super().__post_init__()


def accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def bf16_available(use_cpu: bool = False) -> bool:
    """True on an accelerator with native bf16 (CUDA Ampere or newer, XPU, NPU); False on CPU."""
    import torch

    if use_cpu:
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


PARSER_CLASSES = (ModelArguments, DataArguments, FitArguments)
CONFIG_EPILOG = (
    "A .yaml/.yml/.json file given as the first argument sets these options' defaults (names "
    "with - or _); flags after it override it."
)


def parse_fit_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, FitArguments]:
    """Parse flags, or a YAML/JSON file (first argument) whose values flags may override.

    A file that cannot be read, or names an unknown option, is a
    :class:`~rejalign_tasks.console.UsageError` naming the file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(
        PARSER_CLASSES,
        prog="rejalign-train fit",
        description="LoRA-finetune a vision-language model on refusal-mixed data.",
        epilog=CONFIG_EPILOG,
    )
    argv, _ = split_config(parser, argv)
    model_args, data_args, train_args, extra = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return model_args, data_args, train_args
