"""``rejalign-eval --judge``: a model judge over the run's sample logs once lm-eval is done.

The judge runs as ``rejalign-judge`` in a process of its own (the evaluated model's memory is free
before the judge loads); bad judge options fail before any evaluation starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rejalign_tasks.harness.cli import judge_command, main, split_judge_options
from rejalign_tasks.judge.tiny import TOKENIZER_FOR, build_tiny_judge

JUDGE = "llama-guard-3"


def test_judge_options_are_split_from_lm_evals():
    argv = ["--tasks", "t", "--judge", JUDGE, "--judge-model=/m", "--limit", "2"]
    rest, judge = split_judge_options(argv)
    assert rest == ["--tasks", "t", "--limit", "2"]
    assert judge == {"--judge": JUDGE, "--judge-model": "/m"}
    assert split_judge_options(["--tasks", "t"]) == (["--tasks", "t"], {})


def test_judge_engine_follows_the_backend_and_device():
    run = Path("out/m")
    hf = judge_command({"--judge": JUDGE}, ["run", "--device", "cpu"], run)
    assert hf[1:] == ["-m", "rejalign_tasks.judge", str(run), "--judge", JUDGE, "--engine", "hf",
                      "--device", "cpu"]  # fmt: skip
    vllm = judge_command({"--judge": JUDGE}, ["run", "--model", "vllm-vlm"], run)
    assert vllm[-2:] == ["--engine", "vllm"]
    forced = judge_command({"--judge": JUDGE, "--judge-engine": "hf"}, ["--model", "vllm"], run)
    assert forced[-2:] == ["--engine", "hf"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--judge-model", "/m"], "--judge-model given without --judge NAME"),
        (["--judge"], "--judge needs a value"),
        (["--judge", "gpt-judge"], "--judge gpt-judge: expected one of llama-guard-3,"),
        (["--judge", JUDGE, "--judge-engine", "tgi"], "--judge-engine tgi: expected vllm or hf"),
    ],
)
def test_bad_judge_options_fail_before_the_run(argv, message, tmp_path, capsys):
    assert main(["--tasks", "rejalign_figstep_tiny", "--output_path", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was evaluated


def test_eval_then_judge_in_one_command(tiny_llava, data_dir, tmp_path):
    judge_model = build_tiny_judge(
        JUDGE, tmp_path / "judge", data_dir / "tokenizers" / TOKENIZER_FOR[JUDGE]
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "rejalign_tasks.harness.cli",
        "--model_args", f"pretrained={tiny_llava},dtype=float32",
        "--tasks", "rejalign_figstep_tiny", "--limit", "2", "--device", "cpu",
        "--batch_size", "2", "--gen_kwargs", "max_gen_toks=4", "--output_path", str(out),
        "--judge", JUDGE, "--judge-model", str(judge_model),
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    assert f"rejalign-eval: judging with {JUDGE}: rejalign-judge {results.parent}" in proc.stdout
    (judged,) = results.parent.glob(f"judged_{JUDGE}_*.json")
    assert judged.name == f"judged_{JUDGE}_{results.name[len('results_'):]}"
    metrics = json.loads(judged.read_text())
    assert "asr_llama_guard_3,none" in json.dumps(metrics)
    (copy,) = results.parent.glob(f"samples_rejalign_figstep_tiny_*.judged-{JUDGE}.jsonl")
    rows = [json.loads(line) for line in copy.read_text().splitlines()]
    assert len(rows) == 2 and all(r["judge"]["label"] in ("safe", "unsafe") for r in rows)
