"""Throughput, peak memory and the data pipeline's share of a training step for ``fit``.

Runs the real ``rejalign_train.fit.fit`` on a tiny random LLaVA (or ``--model``) over synthetic
LLaVA-format data shaped like the paper's mix (1-5 turns per record, a quarter refusals, JPEG
photos of ``--image-size`` pixels), each configuration in a fresh process so that its peak RSS
is its own. Measured side by side in one run:

* samples/s of the training loop (after ``--warmup`` steps);
* the collator's time per batch (image decoding, image processing, tokenisation, label masks)
  as a share of the whole step (data + forward + backward + optimizer), with
  ``--dataloader-num-workers 0`` so that it runs in the training loop and is timed exactly;
* the time the loop waits for a batch with worker processes (the default setup): the part of
  the data pipeline that workers do not hide;
* peak resident memory (and peak accelerator memory where there is one).

Target: the collator is under 10% of a step.

    python benchmarks/train.py                   # tiny random LLaVA, 24 steps of batch 16
    python benchmarks/train.py --image-size 640 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_WORDS = (
    "the a of in on with what is shown image picture color person people left right table dog "
    "cat car tree sky red blue green white black answer question man woman street building "
    "two three small large sitting standing holding wearing near behind front water field"
).split()
REFUSAL = "I'm sorry, but I cannot assist with your request"


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def make_data(folder: Path, records: int, image_size: int, seed: int = 0) -> Path:
    """LLaVA-format JSONL: multi-turn records over JPEG photos, a quarter with refusals."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(records):
        w = image_size
        h = int(image_size * rng.uniform(0.6, 1.0))
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            box = (
                sorted(rng.randrange(w) for _ in range(2)),
                sorted(rng.randrange(h) for _ in range(2)),
            )
            draw.ellipse(
                [box[0][0], box[1][0], box[0][1], box[1][1]],
                fill=tuple(rng.randrange(256) for _ in range(3)),
            )
        image.save(images / f"{i}.jpg", quality=90)
        turns = []
        refusal = rng.random() < 0.25
        for t in range(1 if refusal else rng.randint(1, 5)):
            question = _sentence(rng, 4, 16) + "?"
            turns.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
            turns.append(
                {"from": "gpt", "value": REFUSAL if refusal else _sentence(rng, 2, 45) + "."}
            )
        rows.append({"id": str(i), "image": f"images/{i}.jpg", "conversations": turns})
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def child(args: argparse.Namespace) -> dict:
    """One configuration, in this process: run fit with timing hooks; return the figures."""
    import torch
    from transformers import TrainerCallback

    from rejalign_train import fit as fit_module
    from rejalign_train.collator import VisionChatCollator
    from rejalign_train.config import parse_fit_args

    torch.set_num_threads(args.threads)
    workers = args.workers[0]
    collate_times: list[float] = []
    wait_times: list[float] = []
    original_call = VisionChatCollator.__call__
    original_fetch = fit_module.FitTrainer.get_batch_samples

    def timed_call(self, samples):
        start = time.perf_counter()
        out = original_call(self, samples)
        collate_times.append(time.perf_counter() - start)
        return out

    def timed_fetch(self, *a, **k):
        start = time.perf_counter()
        out = original_fetch(self, *a, **k)
        wait_times.append(time.perf_counter() - start)
        return out

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, a, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_train_begin(self, a, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    VisionChatCollator.__call__ = timed_call
    fit_module.FitTrainer.get_batch_samples = timed_fetch
    clock = StepClock()
    argv = [
        "--model", args.model, "--data", args.data, "--output-dir", args.output,
        "--per-device-train-batch-size", str(args.batch_size),
        "--gradient-accumulation-steps", "1",
        "--max-steps", str(args.steps),
        "--save-strategy", "no",
        "--logging-steps", str(args.steps),
        "--disable-tqdm", "true",
        "--dataloader-num-workers", str(workers),
        "--gradient-checkpointing", "false",
        "--overwrite-output-dir",
    ]  # fmt: skip
    fit_module.fit(*parse_fit_args(argv), callbacks=[clock])
    steps = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)][args.warmup :]
    # Per step: one fetch (get_batch_samples) then forward/backward/step; with workers=0 the
    # fetch runs the collator. The first fetch of an epoch also starts the DataLoader.
    collate = collate_times[args.warmup : args.warmup + len(steps)]
    waits = wait_times[args.warmup : args.warmup + len(steps)]
    result = {
        "workers": workers,
        "steps_timed": len(steps),
        "step_ms": 1000 * statistics.median(steps),
        "samples_per_s": args.batch_size * len(steps) / sum(steps),
        "wait_ms": 1000 * statistics.median(waits),
        "wait_share": sum(waits) / sum(steps),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if collate:
        result["collate_ms"] = 1000 * statistics.median(collate)
        result["collate_share"] = sum(collate) / sum(steps)
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: build the tiny random LLaVA)")
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=336, help="photo width in pixels")
    parser.add_argument("--batch-size", type=int, default=16, help="the recipe's per-device 16")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workdir", help="keep the synthetic data and model here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rejalign-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.model:
        from rejalign_train.tiny import build_tiny_llava

        args.model = str(build_tiny_llava(work / "tiny-llava"))
    data = work / "mixed.jsonl"
    if not data.exists():
        make_data(work, args.records, args.image_size)
    results = []
    for workers in args.workers:
        cmd = [
            sys.executable, __file__, "--child", "--model", args.model, "--data", str(data),
            "--output", str(work / f"adapter-w{workers}"), "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--workers", str(workers),
            "--threads", str(args.threads),
        ]  # fmt: skip
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        results.append(json.loads(lines[-1][len("RESULT ") :]))

    print(
        f"fit on {args.model}: batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up "
        f"not timed), {args.image_size}px JPEG photos, {args.threads} torch thread(s)"
    )
    print(f"{'workers':>7} {'samples/s':>10} {'step ms':>8} {'collate ms':>10} {'collate %':>9} "
          f"{'wait ms':>8} {'wait %':>7} {'peak RSS MiB':>12}")  # fmt: skip
    for r in results:
        collate_ms = f"{r['collate_ms']:.1f}" if "collate_ms" in r else "-"
        collate_pct = f"{100 * r['collate_share']:.1f}" if "collate_share" in r else "-"
        print(
            f"{r['workers']:>7} {r['samples_per_s']:>10.1f} {r['step_ms']:>8.1f} {collate_ms:>10} "
            f"{collate_pct:>9} {r['wait_ms']:>8.1f} {100 * r['wait_share']:>7.1f} "
            f"{r['peak_rss_mib']:>12.0f}"
        )
    serial = next((r for r in results if "collate_share" in r), None)
    if serial is not None:
        share = serial["collate_share"]
        verdict = "PASS" if share < 0.10 else "FAIL"
        print(f"collator share of a step: {100 * share:.1f}% (target < 10%): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
