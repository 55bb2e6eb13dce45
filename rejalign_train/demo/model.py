"""The small "instruction-tuned" VLM of the demo and of the e2e tests: one implementation.

A random tiny LLaVA says nothing meaningful, so it is first made into an instruction-tuned model
the way real MLLMs are made, in a few seconds on a CPU: full finetuning on visual instruction
data (shape questions, and typographic list images with FigStep's prompt answered at length),
plus text-only harmful questions answered with a refusal (the alignment an MLLM inherits from its
language model). Like the MLLMs of the paper, the result refuses harmful text and complies with
the same requests delivered as typographic images (FigStep ASR near 1).

The harmful questions are SafeBench's, read through the pinned-data loader (``data_file``):
every 25th question from the fourth, so FigStep-Tiny and the text baseline mostly ask others.
"""

from __future__ import annotations

import json
from pathlib import Path

# The build recipe; the e2e tests and ``rejalign-demo`` use these defaults.
SHAPES = 32  # shape-question records
TYPOGRAPHIC = 12  # typographic list records: BENIGN_INSTRUCTIONS[:12], answered at length
TEXT_REFUSALS = 16  # SafeBench questions as text, answered with the refusal sentence
STEPS = 60
BATCH_SIZE = 8
LEARNING_RATE = 2e-3
MAX_LENGTH = 512
BUILD_MARKER = "rejalign_demo_model.json"


def harmful_text_questions(n: int = TEXT_REFUSALS) -> list[str]:
    """SafeBench questions for the text-only refusals: ``questions[3::25][:n]``."""
    from rejalign_tasks.benchmarks.data import data_file, read_csv_records

    rows = read_csv_records(data_file("figstep/safebench.csv"), ["question"])
    return [row["question"] for row in rows[3::25][:n]]


def instruct_records(
    root: Path, questions: list[str], *, shapes: int = SHAPES, seed: int = 0
) -> list[dict]:
    """The build's training records; images are written under ``root`` (the image root)."""
    from rejalign_train.mixing import REFUSAL_SENTENCE
    from rejalign_train.synthetic import BENIGN_INSTRUCTIONS, shape_records, typographic_records

    text_refusals = [
        {
            "id": f"text_{i}",
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": REFUSAL_SENTENCE},
            ],
        }
        for i, question in enumerate(questions)
    ]
    return (
        shape_records(root / "shapes", shapes, seed=seed + 1)
        + typographic_records(root / "typo", BENIGN_INSTRUCTIONS[:TYPOGRAPHIC])
        + text_refusals
    )


def build_recipe(*, seed: int = 0, steps: int = STEPS, shapes: int = SHAPES) -> dict:
    """What decides the built model (its folder is named after this, see ``model_dir``)."""
    return {
        "format": "rejalign-demo-model/1",
        "seed": seed,
        "steps": steps,
        "shapes": shapes,
        "typographic": TYPOGRAPHIC,
        "text_refusals": TEXT_REFUSALS,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
    }


def recipe_key(recipe: dict) -> str:
    import hashlib

    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def is_built(out: Path, recipe: dict) -> bool:
    """Whether ``out`` holds a finished build of ``recipe`` (its marker is written last)."""
    try:
        marker = json.loads((Path(out) / BUILD_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("recipe") == recipe


def build_instruct_llava(
    work_dir: str | Path,
    *,
    base: str | Path | None = None,
    questions: list[str] | None = None,
    seed: int = 0,
    steps: int = STEPS,
    shapes: int = SHAPES,
    progress: bool = False,
) -> Path:
    """Build the instruction-tuned tiny LLaVA under ``work_dir``; return its folder
    (``work_dir/model``, saved like a Hub checkpoint with its processor).

    ``base`` is a tiny LLaVA from ``rejalign_train.tiny`` (built here, with ``seed``, when not
    given); ``questions`` the harmful text questions (default: ``harmful_text_questions()``).
    ``progress`` shows the Trainer's tqdm bar.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

    from rejalign_train.chat import ChatRenderer
    from rejalign_train.collator import VisionChatCollator
    from rejalign_train.dataset import SampleDataset, prepare_samples
    from rejalign_train.manifest import write_json_atomic
    from rejalign_train.mixing import REFUSAL_SENTENCE
    from rejalign_train.records import iter_records
    from rejalign_train.synthetic import write_jsonl
    from rejalign_train.tiny import build_tiny_llava

    root = Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    if base is None:
        base = build_tiny_llava(root / "tiny-llava", seed=seed)
    if questions is None:
        questions = harmful_text_questions()
    data = write_jsonl(
        root / "instruct.jsonl", instruct_records(root, questions, shapes=shapes, seed=seed)
    )
    processor = AutoProcessor.from_pretrained(base)
    samples, _ = prepare_samples(
        iter_records(data),
        processor,
        ChatRenderer(processor),
        source=str(data),
        image_root=root,
        max_length=MAX_LENGTH,
        refusal_sentence=REFUSAL_SENTENCE,
        progress=False,
    )
    model = AutoModelForImageTextToText.from_pretrained(base)
    model.model.vision_tower.requires_grad_(False)
    args = TrainingArguments(
        output_dir=str(root / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=not progress,
        logging_strategy="no",
        use_cpu=True,
        seed=seed,
    )
    collator = VisionChatCollator(processor, refusal_eos="train")
    Trainer(
        model=model, args=args, train_dataset=SampleDataset(samples), data_collator=collator
    ).train()
    out = root / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    recipe = build_recipe(seed=seed, steps=steps, shapes=shapes)
    write_json_atomic(out / BUILD_MARKER, {"recipe": recipe, "questions": questions})
    return out
