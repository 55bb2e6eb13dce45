"""FigStep rendering and task-load times, measured side by side in one run.

    REJALIGN_DATA_DIR=... python benchmarks/render.py [--repeats 3]

Prints per-image time for all 500 SafeBench instructions (render on demand, in-memory cache hit,
opt-in disk cache write and read) and, in fresh processes, the time to import lm-eval, build its
TaskManager and load ``rejalign_figstep``, with and without rejalign's discovery hook, cold (empty
caches) and warm. Targets: under 10 ms an image on one core; a warm task load under 2 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

LOAD = """
import os, time
t0 = time.perf_counter()
from lm_eval.tasks import TaskManager
t1 = time.perf_counter()
tm = TaskManager()
t2 = time.perf_counter()
load = 0.0
if not os.environ.get("REJALIGN_NO_AUTOLOAD"):
    task = tm.load(["rejalign_figstep"])["tasks"]
    docs = list(next(iter(task.values())).test_docs())
    assert len(docs) == 500
    load = time.perf_counter() - t2
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {load:.3f}")
"""


def time_renders(instructions: list[str], cache_dir: str | None) -> float:
    """Seconds per image to produce every FigStep image once."""
    from rejalign_tasks.benchmarks.typography import (
        figstep_image,
        render_figstep,
        resolve_figstep_font,
    )

    font = resolve_figstep_font()
    start = time.perf_counter()
    if cache_dir is None:
        for text in instructions:
            render_figstep(text, font)
    else:
        if cache_dir:
            os.environ["REJALIGN_RENDER_CACHE"] = cache_dir
        for text in instructions:
            figstep_image(text, font)
    return (time.perf_counter() - start) / len(instructions)


def time_task_load(env: dict) -> tuple[float, float, float]:
    """(import lm_eval, build TaskManager, load rejalign_figstep's 500 docs) in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, check=True
    )
    imports, build, load = map(float, proc.stdout.split()[-3:])
    return imports, build, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from rejalign_tasks.benchmarks.figstep import load_safebench

    instructions = [d["instruction"] for d in load_safebench("figstep/safebench.csv")]
    print(f"{len(instructions)} SafeBench instructions")

    from rejalign_tasks.benchmarks import typography

    pure, memory, cold, warm = [], [], [], []
    for _ in range(args.repeats):
        typography._MEMORY_CACHE.clear()
        os.environ.pop(typography.RENDER_CACHE_ENV, None)
        pure.append(time_renders(instructions, None))
        os.environ["REJALIGN_RENDER_MEMORY_CACHE"] = str(len(instructions))
        time_renders(instructions, "")  # fill the in-memory cache
        memory.append(time_renders(instructions, ""))
        os.environ["REJALIGN_RENDER_MEMORY_CACHE"] = "0"
        typography._MEMORY_CACHE.clear()
        with tempfile.TemporaryDirectory() as cache:
            cold.append(time_renders(instructions, cache))
            warm.append(time_renders(instructions, cache))
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"median of {args.repeats} passes over all images, one process (one core):")
    print(f"  render on demand (default)     : {ms(pure):6.2f} ms/image")
    print(f"  in-memory cache hit            : {ms(memory):6.2f} ms/image")
    print(f"  opt-in disk cache, cold (write): {ms(cold):6.2f} ms/image")
    print(f"  opt-in disk cache, warm (read) : {ms(warm):6.2f} ms/image")
    ratio = statistics.median(warm) / statistics.median(pure)
    print(f"  ratio disk read / render       : {ratio:.2f}")

    with tempfile.TemporaryDirectory() as hf_home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_DATASETS_CACHE")}
        env["HF_HOME"] = hf_home
        cold_load = time_task_load(env)
        warm_loads = sorted(time_task_load(env) for _ in range(args.repeats))
        baseline = sorted(
            time_task_load({**env, "REJALIGN_NO_AUTOLOAD": "1"}) for _ in range(args.repeats)
        )
    warm_load = warm_loads[len(warm_loads) // 2]
    base = baseline[len(baseline) // 2]
    print("task load in a fresh process (seconds):")
    print(f"  lm-eval alone, no rejalign hook : import {base[0]:5.2f}  TaskManager {base[1]:5.2f}")
    for label, (imports, build, load) in (("cold", cold_load), ("warm", warm_load)):
        print(
            f"  with rejalign, {label}           : import {imports:5.2f}  TaskManager {build:5.2f}"
            f"  + load rejalign_figstep (500 docs) {load:5.2f}"
        )
    total = sum(warm_load)
    print(f"  warm total with rejalign        : {total:5.2f} s (target < 2 s)")
    print(f"  ratio to lm-eval's own start    : {total / (base[0] + base[1]):5.2f}")


if __name__ == "__main__":
    main()
