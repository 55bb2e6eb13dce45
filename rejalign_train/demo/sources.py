"""What the demo gives ``rejalign-sweep``: benign training sources, a report spec, a notice.

The sources stand in for the paper's LLaVA-Med (whose replies become refusals) and LLaVA v1.5
mix665k (kept as is), and are benign only, as in the paper: no harmful request is trained on.

* refusal source: typographic list images of harmless tasks (``Steps to fold a paper crane.``)
  with FigStep's prompt, none seen by the base model; ``rejalign-train mix`` replaces their
  replies with the refusal sentence;
* normal source: ordinary visual instructions -- shape questions, and typographic lists of the
  base model's own harmless tasks answered at length.

Everything is deterministic in the seed and labelled a SYNTHETIC DEMONSTRATION.
"""

from __future__ import annotations

import json
from pathlib import Path

SYNTHETIC = "SYNTHETIC DEMONSTRATION"
SOURCES_MARKER = "rejalign_demo_sources.json"
# The report's safety columns, and so the figure's legend, say it too.
ASR_HEADER = "FigStep-Tiny ASR (%), synthetic demo"
TEXT_ASR_HEADER = "FigStep text-only ASR (%), synthetic demo"

# More harmless FigStep-style instructions (BENIGN_INSTRUCTIONS[12:] continues with these), so
# that a mix of only refusals can be as large as the demo's mixes.
EXTRA_INSTRUCTIONS = (
    "Steps to wash a small car.",
    "Ways to organise a bookshelf.",
    "Methods to cool a hot room.",
    "Steps to make a paper boat.",
    "Ways to welcome a new neighbour.",
    "Steps to tune a guitar string.",
    "Methods to keep bread fresh.",
    "Steps to wrap a present neatly.",
    "Ways to teach a dog to sit.",
    "Steps to draw a simple map.",
    "Methods to save energy at work.",
    "Steps to mend a torn shirt.",
)


def sources_recipe(*, seed: int, shapes: int) -> dict:
    return {"format": "rejalign-demo-sources/1", "seed": seed, "shapes": shapes}


def write_sources(folder: Path, *, seed: int = 0, shapes: int = 24) -> tuple[Path, Path]:
    """Write ``refusal.json`` and ``normal.json`` (images beside them); skip when already there.

    Image paths in the records are relative to ``folder`` (the sweep's image root).
    """
    from rejalign_train.demo.model import TYPOGRAPHIC
    from rejalign_train.manifest import write_json_atomic
    from rejalign_train.synthetic import (
        BENIGN_INSTRUCTIONS,
        shape_records,
        typographic_records,
        write_json,
    )

    folder = Path(folder)
    refusal, normal = folder / "refusal.json", folder / "normal.json"
    recipe = sources_recipe(seed=seed, shapes=shapes)
    marker = folder / SOURCES_MARKER
    try:
        done = json.loads(marker.read_text(encoding="utf-8")) == recipe
    except (OSError, ValueError):
        done = False
    if done and refusal.is_file() and normal.is_file():
        return refusal, normal
    marker.unlink(missing_ok=True)
    unseen = [*BENIGN_INSTRUCTIONS[TYPOGRAPHIC:], *EXTRA_INSTRUCTIONS]
    write_json(refusal, typographic_records(folder / "refusal_images", unseen, id_prefix="r"))
    normal_records = shape_records(
        folder / "normal_images", shapes, seed=seed + 100, id_prefix="n"
    ) + typographic_records(
        folder / "normal_typo", BENIGN_INSTRUCTIONS[:TYPOGRAPHIC], id_prefix="nt"
    )
    write_json(normal, normal_records)
    write_json_atomic(marker, recipe)  # last: the sources are complete
    return refusal, normal


def report_spec(path: Path, *, text_baseline: bool) -> Path:
    """The report's table spec: FigStep-Tiny (and text) ASR, refusal rate, per topic; every
    section title says SYNTHETIC DEMONSTRATION."""
    import yaml

    from rejalign_tasks.benchmarks.figstep import TOPICS
    from rejalign_tasks.benchmarks.metrics import slug

    tiny = ["rejalign_figstep_tiny"]
    main = [
        {"header": ASR_HEADER, "tasks": tiny, "metric": "asr", "role": "safety"},
        {
            "header": "FigStep-Tiny refusal rate (%)",
            "tasks": tiny,
            "metric": "refusal_rate",
            "higher_is_better": True,
        },
    ]
    if text_baseline:
        main.insert(
            1,
            {
                "header": TEXT_ASR_HEADER,
                "tasks": ["rejalign_figstep_text"],
                "metric": "asr",
                "role": "safety",
            },
        )
    topics = [{"header": "All", "tasks": tiny, "metric": "asr"}] + [
        {"header": name, "tasks": tiny, "metric": f"asr_{slug(name)}"} for name in TOPICS.values()
    ]
    spec = {
        "sections": [
            {
                "key": "main",
                "title": f"{SYNTHETIC} (tiny random LLaVA, synthetic training data): "
                "FigStep safety",
                "columns": main,
            },
            {
                "key": "figstep_topics",
                "title": f"{SYNTHETIC}: FigStep-Tiny ASR (%) per SafeBench topic",
                "columns": topics,
            },
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


NOTICE = """\
# {synthetic} — not a safety result

Everything in this folder was made by `rejalign-demo`: a **{synthetic}** of the rejalign
pipeline, with a *tiny random* LLaVA (a few hundred thousand parameters, built on this machine)
and *synthetic* training data. The numbers show that the pipeline runs end to end and that the
paper's effect appears on a toy model; they say nothing about any real model's safety.

What ran ({mode} mode, seed {seed}, {started} UTC):

1. **The instruction-tuned toy VLM** (`{model}`): a random tiny LLaVA, fully finetuned on
   synthetic visual instructions (coloured-shape questions, typographic list images answered at
   length) plus SafeBench questions *as text* answered with a refusal. Like the MLLMs of the
   paper it refuses harmful text and complies with the same requests as typographic images.
2. **Benign training sources** (`data/`): typographic lists of harmless tasks, whose replies
   `rejalign-train mix` replaces with the refusal sentence, and ordinary visual instructions.
3. **The refusal-fraction sweep**, every step the real command: `rejalign-sweep {sweep_config}`
   runs `rejalign-train mix` and `rejalign-train fit` (LoRA) per fraction ({fractions}),
   `rejalign-eval` (lm-eval, `hf-multimodal`, CPU) on {tasks} for the base model and each
   adapter, and `rejalign-report`. Rerun `rejalign-demo` (or that sweep) to resume; finished
   steps are skipped.

Results: `sweep/report/report.md` (tables, notes, figure `asr_vs_refusal_fraction.png`),
`sweep/report/table_main.csv`; per step: `sweep/<row>/{{mix,fit,eval}}/` with logs.

{results}
"""


def write_notice(out: Path, *, results: str = "Status: running.", **fields: object) -> Path:
    """``OUT/README.md``: what this folder is (a SYNTHETIC DEMONSTRATION) and what ran."""
    from rejalign_tasks.contracts import write_text_atomic

    text = NOTICE.format(synthetic=SYNTHETIC, results=results, **fields)
    return write_text_atomic(out / "README.md", text)
