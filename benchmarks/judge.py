"""rejalign-judge speed: vLLM, every prompt at once, against transformers one sample at a time.

garak's and JailbreakBench's judges call the judge model once per completion; ``rejalign-judge
--engine vllm`` hands vLLM every prompt of a chunk in one ``LLM.generate``. Both ways here judge
the same ``N`` logged samples with the same tiny random judge (Llama Guard 3's architecture on
the real Llama 3.1 tokenizer and chat template, :mod:`rejalign_tasks.judge.tiny`), greedy, in
float32, each in a fresh process of this interpreter (which must have vLLM), through the real
runner (:class:`rejalign_tasks.judge.run.Judging`: prompts, engine, parser, judged files):

1. ``--engine vllm`` with the whole log as one chunk;
2. ``--engine hf`` with ``--batch-size 1``: one ``generate`` per sample.

The sample log is a real ``lm_eval`` log (``hf-multimodal`` on ``rejalign_figstep_tiny`` with a
tiny LLaVA, 10 samples) whose samples are repeated to ``N`` with new doc ids and replies taken in
turn from a mix that the tiny judge labels differently; ``--run-dir`` judges a log of yours
instead. Model loading is timed apart and excluded; imports too. Printed: each way's judging
time, the ratio, and whether the labels agree. Target: vLLM at least 5x faster at N = 500.

    REJALIGN_DATA_DIR=... .ci-cache/venv-vllm/bin/python benchmarks/judge.py
    ... benchmarks/judge.py --samples 100          # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "rejalign_figstep_tiny"
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
REPLIES = (
    "Sure, here is how. Step 1: gather the materials and prepare them carefully.",
    "I'm sorry, but I cannot assist with your request",
    "Here is a short poem about the sea, its waves and the light over the water.",
    "Sure. Step one is to pick a quiet place, then plan the rest of the day in detail.",
)


def make_log(out: Path, n: int) -> Path:
    """A real lm_eval log of 10 samples, repeated to ``n`` (see the module docstring)."""
    from rejalign_train.tiny import build_tiny_llava

    llava = build_tiny_llava(out / "llava")
    run = out / "run"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf-multimodal",
           "--model_args", f"pretrained={llava},dtype=float32", "--apply_chat_template",
           "--tasks", TASK, "--limit", "10", "--device", "cpu", "--batch_size", "10",
           "--gen_kwargs", "max_gen_toks=4", "--output_path", str(run),
           "--log_samples"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **VLLM_ENV})
    (samples,) = run.rglob(f"samples_{TASK}_*.jsonl")
    (results,) = run.rglob("results_*.json")
    base = [json.loads(line) for line in samples.read_text().splitlines() if line]
    rows = []
    for i in range(n):
        reply = REPLIES[i % len(REPLIES)]
        rows.append({**base[i % len(base)], "doc_id": i, "resps": [[reply]],
                     "filtered_resps": [reply]})  # fmt: skip
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = json.loads(results.read_text())
    data["n-samples"][TASK]["effective"] = n
    results.write_text(json.dumps(data))
    return run


def phase(engine: str, run: str, model: str) -> dict:
    """Judge every sample under ``run``; time model loading and judging apart."""
    from rejalign_tasks.judge.judges import get_judge
    from rejalign_tasks.judge.run import Judging, find_results_files

    opts = (
        {"dtype": "float32", "vllm_args": {"enforce_eager": True, "max_model_len": 2048}}
        if engine == "vllm"
        else {"dtype": "float32", "batch_size": 1, "device": "cpu"}
    )
    judging = Judging(get_judge("llama-guard-3"), model, engine, chunk_size=10**9,
                      engine_opts=opts, log=lambda _: None)  # fmt: skip
    t0 = time.perf_counter()
    judging.engine  # noqa: B018 (load the model, timed apart)
    t1 = time.perf_counter()
    (results_file,) = find_results_files(Path(run))
    judging.judge_results_file(results_file)
    t2 = time.perf_counter()
    (judged,) = Path(run).rglob("*.judged-llama-guard-3.jsonl")
    labels = [json.loads(line)["judge"]["label"] for line in judged.read_text().splitlines()]
    return {"load_s": t1 - t0, "judge_s": t2 - t1, "labels": labels}


def run_phase(engine: str, run: Path, model: Path) -> dict:
    here = str(Path(__file__).parent)
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); from judge import phase; "
        f"print('RESULT ' + json.dumps(phase({engine!r}, {str(run)!r}, {str(model)!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **VLLM_ENV})  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{engine} phase failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--run-dir", help="judge this lm-eval output folder instead")
    args = parser.parse_args()
    from rejalign_tasks.judge.tiny import TOKENIZER_FOR, build_tiny_judge

    data = Path(os.environ.get("REJALIGN_DATA_DIR", "data"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_judge(
            "llama-guard-3", tmp / "judge", data / "tokenizers" / TOKENIZER_FOR["llama-guard-3"]
        )
        log = Path(args.run_dir) if args.run_dir else make_log(tmp / "log", args.samples)
        results = {}
        for engine in ("vllm", "hf"):
            run = tmp / f"run-{engine}"
            shutil.copytree(log, run)
            results[engine] = run_phase(engine, run, model)
        n = len(results["vllm"]["labels"])
        print(f"judging {n} logged samples, tiny Llama Guard 3, greedy, float32")
        for engine, name in (("vllm", "vLLM, all at once"), ("hf", "transformers, one at a time")):
            r = results[engine]
            print(f"  {name:<28} judge {r['judge_s']:7.2f} s   (model load {r['load_s']:.2f} s)")
        ratio = results["hf"]["judge_s"] / results["vllm"]["judge_s"]
        same = results["vllm"]["labels"] == results["hf"]["labels"]
        labels = results["vllm"]["labels"]
        counts = {k: labels.count(k) for k in sorted(set(labels))}
        print(f"  speed-up {ratio:.1f}x (target >= 5x); labels agree: {same}; labels {counts}")


if __name__ == "__main__":
    main()
