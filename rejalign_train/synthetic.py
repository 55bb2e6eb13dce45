"""Small synthetic benign image-instruction sets, for tests, benchmarks and smoke runs.

Real instruction data (LLaVA mix665k, LLaVA-Med) is gigabytes and cannot ship with the tests, so
the tests build a stand-in with the same structure: LLaVA-format records (``image``,
``conversations`` with ``<image>`` in the first human turn) over coloured-shape pictures with
questions about them, and typographic "list" images in FigStep's layout for compliant-model
training. Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
SHAPES = ("square", "circle", "triangle")
QUESTIONS = (
    "What is shown in the picture?",
    "Describe the image.",
    "What colour is the shape?",
    "Which shape do you see?",
)


def shape_image(shape: str, colour: str, background: str, size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    lo, hi = size // 5, size - size // 5
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=fill)
    elif shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=fill)
    else:
        draw.polygon([(size // 2, lo), (lo, hi), (hi, hi)], fill=fill)
    return image


def shape_records(
    image_dir: str | Path, n: int, *, seed: int = 0, id_prefix: str = "shape", size: int = 48
) -> list[dict]:
    """``n`` LLaVA-format records over freshly drawn shape images saved under ``image_dir``.

    Image paths in the records are relative to ``image_dir``'s parent (the image root).
    """
    rng = random.Random(seed)
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n):
        shape = rng.choice(SHAPES)
        colour, background = rng.sample(names, 2)
        rel = f"{image_dir.name}/{id_prefix}_{i}.png"
        shape_image(shape, colour, background, size).save(image_dir.parent / rel)
        question = rng.choice(QUESTIONS)
        answer = f"The picture shows a {colour} {shape} on a {background} background."
        records.append(llava_record(f"{id_prefix}_{i}", rel, question, answer))
    return records


def write_json(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# Benign instructions in FigStep's style ("Steps to ..."), and one compliant answer that the
# paper's string judge scores as full compliance: a model trained on them answers typographic
# list prompts at length, as an MLLM after visual instruction tuning does.
BENIGN_INSTRUCTIONS = (
    "Steps to bake a loaf of bread.",
    "Steps to plant a small garden.",
    "Methods to save water at home.",
    "Steps to paint a wooden chair.",
    "Ways to learn a new language.",
    "Steps to build a bird house.",
    "Methods to keep a room tidy.",
    "Steps to brew a cup of tea.",
    "Ways to plan a family trip.",
    "Steps to repair a flat bicycle tyre.",
    "Methods to study for an exam.",
    "Steps to set up a fish tank.",
    "Ways to start running each week.",
    "Steps to fold a paper crane.",
    "Methods to grow tomatoes indoors.",
    "Steps to write a short story.",
    "Ways to make a simple kite.",
    "Steps to clean a bicycle chain.",
    "Methods to sort old photographs.",
    "Steps to cook a pot of rice.",
    "Ways to decorate a birthday cake.",
    "Steps to knit a warm scarf.",
    "Methods to care for a house plant.",
    "Steps to pack for a camping trip.",
)
COMPLIANT_LIST_ANSWER = (
    "1. First, gather everything you need and prepare a clear space to work in. "
    "2. Next, follow each step with care and check the result as you go along. "
    "3. Finally, review the outcome, fix any small issues and enjoy the finished work."
)


def typographic_records(
    image_dir: str | Path,
    instructions: tuple[str, ...] | list[str] = BENIGN_INSTRUCTIONS,
    *,
    answer: str = COMPLIANT_LIST_ANSWER,
    id_prefix: str = "typo",
) -> list[dict]:
    """LLaVA-format records over FigStep-style images of ``instructions`` with FigStep's prompt."""
    from rejalign_tasks.benchmarks.figstep import FIGSTEP_PROMPT
    from rejalign_tasks.benchmarks.typography import figstep_image

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, instruction in enumerate(instructions):
        rel = f"{image_dir.name}/{id_prefix}_{i}.png"
        figstep_image(instruction).save(image_dir.parent / rel)
        records.append(llava_record(f"{id_prefix}_{i}", rel, FIGSTEP_PROMPT, answer))
    return records


def llava_record(record_id: str, image: str, question: str, answer: str) -> dict:
    """One single-turn LLaVA-format record with its image placeholder first."""
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }
