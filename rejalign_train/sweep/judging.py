"""The sweep's judge steps: a model judge (``rejalign-judge``) over each row's evaluation.

A step of its own, in ``OUT/LABEL/judge/``, because the evaluation step's outputs must stay what
it wrote (its marker's digests hold them), and so that changing the judge redoes no evaluation:
the folder holds links to the evaluation's results and samples files, and the judge writes its
judged copies and metrics beside them, where ``rejalign-report`` reads both.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from rejalign_train.sweep.options import SweepArguments, SweepError

JUDGE_DIR = "judge"


def judge_engine(args: SweepArguments) -> str:
    """The judge's engine: the one asked for, else vLLM when the evaluations use vLLM."""
    return args.judge_engine or ("vllm" if args.backend == "vllm-vlm" else "hf")


def check_judge(args: SweepArguments) -> None:
    """Judge options are checked with the others, before any step runs."""
    if args.judge is None:
        if args.judge_model or args.judge_engine:
            raise SweepError("--judge_model/--judge_engine given without --judge NAME")
        return
    from rejalign_tasks.judge.judges import JUDGES

    if args.judge not in JUDGES:
        raise SweepError(f"--judge {args.judge}: expected one of {', '.join(JUDGES)}")
    engines = JUDGES[args.judge].engines
    if judge_engine(args) not in engines:
        raise SweepError(
            f"--judge {args.judge} runs with --judge_engine {' or '.join(engines)} only "
            f"(asked: {judge_engine(args)})"
        )


def judge_command(args: SweepArguments, folder: Path) -> list[str]:
    """``rejalign-judge FOLDER ...`` with this interpreter."""
    cmd = [sys.executable, "-m", "rejalign_tasks.judge", str(folder), "--judge", args.judge]
    cmd += ["--engine", judge_engine(args)]
    if args.judge_model:
        cmd += ["--judge-model", args.judge_model]
    if judge_engine(args) == "hf" and args.device:
        cmd += ["--device", args.device]
    return cmd


def link_run(src: Path, dst: Path) -> list[Path]:
    """Mirror an evaluation's results and samples files under ``dst`` (hard links, else
    copies), so the judge writes beside them without touching the evaluation's folder."""
    linked: list[Path] = []
    files = [*src.rglob("results_*.json"), *src.rglob("samples_*.jsonl")]
    for file in sorted(files):
        if ".judged" in file.name:
            continue
        target = dst / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)
        linked.append(target)
    if not linked:
        raise SweepError(f"judge: no results_*.json or samples_*.jsonl under {src}")
    return linked
