"""``rejalign-train fit``: LoRA-finetune a VLM on refusal-mixed data with the HF Trainer.

The run writes into ``OUTPUT_DIR.incomplete`` (checkpoints, then the final files) and renames the
finished folder to ``OUTPUT_DIR`` as its last act, so an interrupted run never leaves a folder
that looks finished; ``--resume`` picks the interrupted run up from its last checkpoint. The
output folder holds a standard peft adapter (``adapter_model.safetensors``, loadable by lm-eval's
``hf-multimodal`` ``peft=`` and ``vllm-vlm`` ``lora_local_path=``), the processor with its chat
template, ``rejalign_manifest.json`` and, with ``--merge``, merged full weights in ``merged/``.

The same command runs under ``accelerate launch`` or ``torchrun`` (DDP, DeepSpeed ZeRO-2/3, FSDP
through the usual ``--deepspeed``/``--fsdp``/``--fsdp_config`` Trainer flags): only the main
process touches the output folders, and the adapter is gathered from the shards on every process
and written by the main one (:func:`save_adapter`), in the single-process format, and checked
(:func:`check_adapter`) before the folder is renamed into place. FSDP's auto-wrap gets the layer
classes the model really has (:func:`configure_fsdp`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    Trainer,
    TrainerCallback,
    set_seed,
)

from rejalign_tasks.console import UsageError, run_command
from rejalign_train.chat import ChatRenderer
from rejalign_train.collator import VisionChatCollator
from rejalign_train.config import DataArguments, FitArguments, ModelArguments
from rejalign_train.dataset import SampleDataset, prepare_samples
from rejalign_train.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    is_finished,
    library_versions,
    read_manifest,
    sha256_file,
    utc_now,
    write_json_atomic,
)
from rejalign_train.model_setup import (
    FitError,
    add_lora,
    configure_fsdp,
    distributed_setup,
    init_deepspeed_comm,
    load_model,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

PROG = "rejalign-train fit"
INCOMPLETE_SUFFIX = ".incomplete"
RUN_SPEC_NAME = "rejalign_run.json"
MERGED_DIR = "merged"
# Where VLM classes keep the module that maps vision features into the language model.
def end_of_turn_tokens(processor, model_name: str, trust_remote_code: bool) -> list[str]:
    """Tokens that end a reply: the tokenizer's EOS and the generation config's EOS ids."""
    tokenizer = processor.tokenizer
    ids: list[int] = []
    try:
        gen = GenerationConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
        eos = gen.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    except (OSError, ValueError):
        pass
    return [t for t in tokenizer.convert_ids_to_tokens(ids) if t] + [tokenizer.eos_token]


def load_processor(model_name: str, trust_remote_code: bool = False):
    """The model's processor; a clear error where transformers needs torchvision to build it.

    transformers builds some processors (Qwen2-VL's and Qwen2.5-VL's, for their video processor)
    only with torchvision, whose wheels pin one torch release: torchvision 0.(m+15) for torch 2.m.
    """
    try:
        return AutoProcessor.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        minor = torch.__version__.split("+")[0].split(".")[1]
        wanted = f"0.{int(minor) + 15}.*" if minor.isdigit() else "0.(m+15).* for torch 2.m"
        cause = " ".join(str(exc).split()).split(". ")[0]
        raise FitError(
            f"{model_name}: transformers cannot build this model's processor without torchvision "
            f"({cause}). Install the torchvision built for your torch {torch.__version__}: "
            f"pip install 'torchvision=={wanted}' (keep torch's index, e.g. PyTorch's CPU index "
            "for a +cpu torch); see the README, Install"
        ) from exc


# --------------------------------------------------------------------------- the trainer


class FitTrainer(Trainer):
    """The HF Trainer with the projector in its own parameter groups at its own learning rate."""

    def __init__(self, *args, projector_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None and self.projector_lr is not None:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[bool, bool], list] = {}
            for name, param in opt_model.named_parameters():
                if param.requires_grad:
                    key = (".modules_to_save." in name, name in decay)
                    groups.setdefault(key, []).append(param)
            param_groups = []  # LoRA first: the logged learning rate is the first group's
            for (is_projector, decays), params in sorted(groups.items()):
                group = {
                    "params": params,
                    "weight_decay": self.args.weight_decay if decays else 0.0,
                }
                if is_projector:
                    group["lr"] = self.projector_lr
                param_groups.append(group)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(
                self.args, opt_model
            )
            self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return super().create_optimizer(model)


class _StepTimer(TrainerCallback):
    """Wall time of the training loop, for the manifest."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------- output folders


def incomplete_dir(output_dir: str | os.PathLike) -> Path:
    final = Path(output_dir).expanduser().resolve()
    return final.with_name(final.name + INCOMPLETE_SUFFIX)


def _run_spec(model_args, data_args, train_args, data_sha256: str) -> dict:
    """What must not change between an interrupted run and its resumption."""
    return {
        "model": model_args.model,
        "data_sha256": data_sha256,
        "model_args": dataclasses.asdict(model_args),
        "data_args": {k: v for k, v in dataclasses.asdict(data_args).items() if k != "data"},
        "seed": train_args.seed,
        "learning_rate": train_args.learning_rate,
        "num_train_epochs": train_args.num_train_epochs,
        "max_steps": train_args.max_steps,
        "per_device_train_batch_size": train_args.per_device_train_batch_size,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
    }


def _check_resumable(work: Path, spec: dict) -> None:
    path = work / RUN_SPEC_NAME
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    changed = sorted(k for k in spec if previous.get(k) != spec[k])
    if changed:
        raise FitError(
            f"--resume: {work} was started with different {', '.join(changed)}; resume with the "
            "same settings, or pass --overwrite-output-dir to start over"
        )


def _prepare_folders(final: Path, work: Path, train_args: FitArguments, is_main: bool) -> bool:
    """Check the output folders; return True when the run is already finished (--resume)."""
    if final.exists():
        if is_finished(final):
            if train_args.resume and not train_args.overwrite_output_dir:
                logger.info("%s is already a finished run; nothing to resume", final)
                return True
            if not train_args.overwrite_output_dir:
                raise FitError(
                    f"{final} already holds a finished adapter; pass --overwrite-output-dir to "
                    "replace it"
                )
        elif not train_args.overwrite_output_dir:
            raise FitError(
                f"{final} exists and is not a finished rejalign adapter; choose another "
                "--output-dir or pass --overwrite-output-dir"
            )
    if work.exists():
        if train_args.overwrite_output_dir and not train_args.resume:
            if is_main:
                shutil.rmtree(work)
        elif not train_args.resume:
            raise FitError(
                f"an interrupted run left {work}; pass --resume to continue it or "
                "--overwrite-output-dir to start over"
            )
    elif train_args.resume:
        logger.warning("--resume: no interrupted run at %s; starting from the beginning", work)
    return False


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def save_adapter(trainer: Trainer, staging: Path) -> None:
    """Write the adapter into ``staging``; every process must call it (the gathers are collective).

    ``Trainer.save_model`` gathers ZeRO-3 and FSDP ``FULL_STATE_DICT`` shards, and writes from the
    main process only. Under FSDP with ``state_dict_type: SHARDED_STATE_DICT`` (a fine choice for
    the checkpoints) it writes nothing at all, so the final adapter is gathered in full here.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        state_dict_type = str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
        if "FULL_STATE_DICT" not in state_dict_type:
            state_dict = trainer.accelerator.get_state_dict(trainer.model)
            trainer._save(str(staging), state_dict=state_dict)
            return
    trainer.save_model(str(staging))


def check_adapter(staging: Path) -> None:
    """The saved adapter is complete: both peft files, and every LoRA tensor non-empty."""
    from safetensors import safe_open

    missing = [name for name in ADAPTER_FILES if not (staging / name).is_file()]
    if missing:
        raise FitError(f"the trainer saved no {' or '.join(missing)} in {staging}")
    with safe_open(staging / ADAPTER_FILES[0], "pt") as weights:
        names = list(weights.keys())
        empty = [n for n in names if 0 in weights.get_slice(n).get_shape()]
    if not any(".lora_" in n for n in names) or empty:
        raise FitError(
            f"{staging / ADAPTER_FILES[0]}: incomplete adapter ("
            + (f"empty tensors {', '.join(empty[:3])}" if empty else "no LoRA weights")
            + "): the trainer gathered no weights from the shards"
        )


def _finalise(staging: Path, final: Path, work: Path) -> None:
    """Move the finished folder into place (the run's last act), then drop the work folder."""
    old = work / "previous"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(work, ignore_errors=True)


def merge_adapter(
    base: str, adapter_dir: Path, out_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False
) -> None:
    """Write base + adapter as one full model (with the processor) into ``out_dir``."""
    from peft import PeftModel

    model = AutoModelForImageTextToText.from_pretrained(
        base, dtype=dtype, trust_remote_code=trust_remote_code
    )
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code).save_pretrained(
        out_dir
    )


# --------------------------------------------------------------------------- the command


def read_training_records(path: str):
    """Normalised, checked records from the ``mix`` output (or any LLaVA/messages file)."""
    from rejalign_train.records import iter_records

    return iter_records(path)


def mix_manifest(data: Path) -> tuple[Path | None, dict | None]:
    """The manifest ``rejalign-train mix`` wrote beside ``data`` (path and content), if any."""
    from rejalign_train.mixing import manifest_path

    path = manifest_path(data)
    if not path.is_file():
        return None, None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FitError(f"{path}: unreadable mix manifest ({exc})") from exc
    return path, content


def fit(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: FitArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> Path:
    """Train and write the adapter; return the finished output folder."""
    from accelerate import PartialState

    _ = train_args.device  # sets up the (distributed) state the Trainer will use
    state = PartialState()
    if train_args.deepspeed and state.num_processes > 1:
        init_deepspeed_comm()
    final = Path(train_args.output_dir).expanduser().resolve()
    work = incomplete_dir(final)
    if _prepare_folders(final, work, train_args, state.is_main_process):
        return final
    state.wait_for_everyone()

    data_path = Path(data_args.data).expanduser()
    if not data_path.is_file():
        raise FitError(f"--data {data_path}: file not found")
    data_sha256 = sha256_file(data_path)
    mix_path, mix_content = mix_manifest(data_path)
    spec = _run_spec(model_args, data_args, train_args, data_sha256)
    if train_args.resume and work.exists():
        _check_resumable(work, spec)
    set_seed(train_args.seed)

    processor = load_processor(model_args.model, model_args.trust_remote_code)
    renderer = ChatRenderer(
        processor,
        end_of_turn_tokens(processor, model_args.model, model_args.trust_remote_code),
    )
    image_root = data_args.image_root or str(data_path.parent)
    samples, stats = prepare_samples(
        read_training_records(str(data_path)),
        processor,
        renderer,
        source=str(data_path),
        image_root=image_root,
        max_length=data_args.max_length,
        overlong=data_args.overlong,
        refusal_sentence=data_args.refusal_sentence,
        progress=state.is_main_process,
    )
    if data_args.refusal_eos == "mask" and stats.refusal_samples == 0:
        logger.warning(
            "no sample contains the refusal sentence %r: --refusal-eos mask changes nothing",
            data_args.refusal_sentence,
        )

    dtype = resolve_dtype(model_args, train_args)
    model = load_model(model_args, dtype)
    model.config.use_cache = False
    model, lora_info = add_lora(model, model_args)
    if train_args.gradient_checkpointing:
        model.enable_input_require_grads()
    configure_fsdp(model, train_args)

    # Only now, with data and model known good, does the run leave a trace on disk.
    if state.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        if not (work / RUN_SPEC_NAME).exists():
            write_json_atomic(work / RUN_SPEC_NAME, spec)
    state.wait_for_everyone()
    train_args.output_dir = str(work)  # checkpoints go to the work folder

    timer = _StepTimer()
    trainer = FitTrainer(
        model=model,
        args=train_args,
        train_dataset=SampleDataset(samples),
        data_collator=VisionChatCollator(
            processor, refusal_eos=data_args.refusal_eos, max_length=data_args.max_length
        ),
        processing_class=processor,
        callbacks=[timer, *(callbacks or [])],
        projector_lr=model_args.projector_lr if model_args.train_projector else None,
    )
    distributed = distributed_setup(trainer)
    if train_args.fsdp_plugin_args and distributed["type"] != "FSDP" and state.is_main_process:
        logger.warning(
            "--fsdp: accelerate turns FSDP on only with GPUs or other accelerators; this run "
            "trains with DDP (%s) instead: the same adapter, without sharding",
            distributed["type"],
        )
    checkpoint = None
    if train_args.resume and work.exists():
        checkpoint = last_complete_checkpoint(work, remove_partial=state.is_main_process)
    state.wait_for_everyone()
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)

    staging = work / "final"
    if state.is_main_process and staging.exists():
        shutil.rmtree(staging)
    state.wait_for_everyone()
    save_adapter(trainer, staging)  # every rank: gathers ZeRO-3/FSDP shards
    if state.is_main_process:
        check_adapter(staging)
        processor.save_pretrained(staging)
        merged = None
        if train_args.merge:
            merge_adapter(
                model_args.model, staging, staging / MERGED_DIR, dtype, model_args.trust_remote_code
            )
            merged = MERGED_DIR
        manifest = {
            "format": MANIFEST_FORMAT,
            "complete": True,
            "finished": utc_now(),
            "base_model": model_args.model,
            "adapter": {"type": "lora", **lora_info},
            "merged": merged,
            "data": {
                "path": str(data_path.resolve()),
                "sha256": data_sha256,
                "image_root": str(Path(image_root).resolve()),
                "records": stats.records,
                "used": stats.used,
                "refusal_samples": stats.refusal_samples,
                "images": stats.images,
                "skipped_overlong": stats.skipped_overlong,
                "skipped_ids": stats.skipped_ids,
                "max_tokens": stats.max_tokens,
                "refusal_fraction": stats.refusal_samples / stats.used,
                "mix_manifest": mix_content,
                "mix_manifest_path": str(mix_path) if mix_path else None,
                "mix_manifest_sha256": sha256_file(mix_path) if mix_path else None,
            },
            "hyperparameters": {
                "model": dataclasses.asdict(model_args),
                "data": dataclasses.asdict(data_args),
                "training": {**train_args.to_dict(), "output_dir": str(final)},
            },
            "training": {
                "global_step": trainer.state.global_step,
                "epochs": trainer.state.epoch,
                "train_loss": result.training_loss,
                "log_history": trainer.state.log_history,
                "resumed_from": Path(checkpoint).name if checkpoint else None,
                "world_size": state.num_processes,
                "distributed": distributed,
                "seconds": getattr(timer, "seconds", None),
            },
            "versions": library_versions(),
        }
        write_json_atomic(staging / MANIFEST_NAME, manifest)
        _finalise(staging, final, work)
        logger.info("finished: %s", final)
    state.wait_for_everyone()
    train_args.output_dir = str(final)
    return final


def main(argv: list[str] | None = None) -> int:
    """``rejalign-train fit [CONFIG.yaml] [--flags]``: 0 done, 2 bad input, 130 interrupted."""
    from rejalign_train.records import RecordError

    return run_command(
        PROG,
        _main,
        argv,
        usage_errors=(FitError, RecordError),
        interrupted="interrupted; rerun the same command with --resume to continue from the "
        "last checkpoint",
    )


def _main(argv: list[str]) -> int:
    from rejalign_train.config import parse_fit_args

    try:
        model_args, data_args, train_args = parse_fit_args(argv)
    except ValueError as exc:  # TrainingArguments' own checks of the options
        raise UsageError(str(exc)) from exc
    out = fit(model_args, data_args, train_args)
    if os.environ.get("RANK", "0") == "0":
        print(out)
    return 0


__all__ = ["fit", "main", "FitError", "is_finished", "read_manifest", "merge_adapter"]


def trainer_checkpoints(work: Path) -> tuple[list[Path], list[Path]]:
    """(complete, partial) Trainer checkpoints in a run's work folder, oldest first.

    The Trainer writes ``trainer_state.json`` after the weights, optimizer, scheduler and RNG
    states, so a checkpoint without a readable one was cut short by a kill; transformers'
    ``get_last_checkpoint`` would still pick it when it is the newest.
    """
    found = sorted(
        (p for p in work.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
        key=lambda p: int(p.name[11:]),
    )
    complete = []
    for path in found:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        complete.append(path)
    return complete, [p for p in found if p not in complete]


def last_complete_checkpoint(work: Path, remove_partial: bool = True) -> str | None:
    """The newest complete checkpoint; partial ones (a kill mid-save) are removed first.

    In a distributed run every process asks, and only the main one removes (``remove_partial``).
    """
    complete, partial = trainer_checkpoints(work)
    for path in partial if remove_partial else ():
        logger.warning("discarding %s: the checkpoint was cut short", path)
        shutil.rmtree(path, ignore_errors=True)
    return str(complete[-1]) if complete else None
