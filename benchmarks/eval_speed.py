"""FigStep evaluation speed on vLLM: raw vLLM, our task through lm-eval, a one-at-a-time loop.

One run, the same tiny LLaVA, the same FigStep-Tiny prompts (50), the same greedy decoding and
maximum of new tokens, each way in a fresh process of this interpreter (which must have vLLM):

1. raw ``vllm.LLM.generate`` over all prompts at once (prompts and images prepared beforehand);
2. ``lm_eval --model vllm-vlm --apply_chat_template --tasks rejalign_figstep_tiny`` (the CLI,
   in-process), with no ``--batch_size`` (rejalign makes it ``auto``);
3. a transformers loop, one prompt at a time, as the upstream evaluation scripts run.

Model loading (with one warm-up request in both vLLM ways) is timed apart and excluded
everywhere, and so are imports. Each way runs ``--repeats`` times, interleaved, and the best
(shortest) run of each is compared: on a shared machine other load only ever adds time.
Printed: each way's time, lm-eval's time split into generation and the rest (our task's data,
images and scoring, and lm-eval's own work), the ratios, and whether the completions agree.
Targets: our task adds at most 10% to raw vLLM's time; vLLM batched is at least 5x faster than
the loop.

    REJALIGN_DATA_DIR=... .ci-cache/venv-vllm/bin/python benchmarks/eval_speed.py
    ... benchmarks/eval_speed.py --prompts 20 --max-tokens 128 --model DIR   # quicker / yours
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "rejalign_figstep_tiny"
# Small, quick vLLM on CPU (see the README): engine in-process, eager mode, 1 GiB of KV cache.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_KWARGS = {"dtype": "float32", "enforce_eager": True, "seed": 1234}


def _prompts(model: str, n: int):
    """FigStep-Tiny's first ``n`` prompts as lm-eval builds them: chat template, one image."""
    from transformers import AutoProcessor

    from rejalign_tasks.benchmarks.figstep import doc_to_image, doc_to_text, load_safebench

    processor = AutoProcessor.from_pretrained(model)
    docs = load_safebench("figstep/SafeBench-Tiny.csv")[:n]
    prompts, images = [], []
    for doc in docs:
        text = doc_to_text(doc).replace("<image>", "")
        content = [{"type": "image"}, {"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        images.append(doc_to_image(doc)[0])
    return processor, prompts, images


def _warm_up(llm, request) -> None:
    """One token for one prompt: vLLM loads its input processor on the first request.

    lm-eval's ``VLLM.__init__`` does that work while it resolves the chat template, so without
    this the first timed ``generate`` of the raw way would carry a start-up cost the other lacks.
    Counted as model loading in both vLLM ways.
    """
    from vllm import SamplingParams

    llm.generate([request], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)


def phase_raw(model: str, n: int, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    _, prompts, images = _prompts(model, n)
    requests = [
        {"prompt": p, "multi_modal_data": {"image": im}}
        for p, im in zip(prompts, images, strict=True)
    ]
    t0 = time.perf_counter()
    llm = LLM(model=model, **VLLM_KWARGS)
    _warm_up(llm, requests[0])
    load = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    run = time.perf_counter() - t0
    return {
        "load_s": load,
        "run_s": run,
        "tokens": [len(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
    }


def _timed(fn, timings: dict, key: str):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[key] += time.perf_counter() - t0

    return wrapper


def phase_lm_eval(model: str, n: int, max_tokens: int) -> dict:
    """The real ``lm_eval`` CLI in this process; model load and generation timed by wrappers."""
    import lm_eval.__main__
    import lm_eval.evaluator  # noqa: F401 (imports excluded from the timing)
    import lm_eval.models.vllm_vlms as vllm_vlms
    import lm_eval.tasks  # noqa: F401
    from vllm import TextPrompt

    from rejalign_tasks.benchmarks import figstep

    _, prompts, images = _prompts(model, 1)
    timings = {"load_s": 0.0, "generate_s": 0.0, "tokens": [], "texts": []}
    cls = vllm_vlms.VLLM_VLM
    init, generate = cls.__init__, cls._multimodal_model_generate
    generate_until = cls.generate_until
    keep = []  # the model outlives the CLI call, so its shutdown is not timed (nor in raw)

    def timed_init(self, *args, **kwargs):
        t0 = time.perf_counter()
        init(self, *args, **kwargs)
        _warm_up(self.model, TextPrompt(prompt=prompts[0], multi_modal_data={"image": images[0]}))
        timings["load_s"] += time.perf_counter() - t0
        keep.append(self)

    def timed_generate(self, *args, **kwargs):
        t0 = time.perf_counter()
        outputs = generate(self, *args, **kwargs)
        timings["generate_s"] += time.perf_counter() - t0
        timings["tokens"] += [len(o.outputs[0].token_ids) for o in outputs]
        return outputs

    def answers(self, requests, *args, **kwargs):  # in request (= document) order
        texts = generate_until(self, requests, *args, **kwargs)
        timings["texts"] += texts
        return texts

    cls.__init__, cls._multimodal_model_generate = timed_init, timed_generate
    cls.generate_until = answers
    # Our task's own code (data, images, scoring), looked up by lm-eval when it loads the task.
    timings["task_code_s"] = 0.0
    for name in ("safebench_tiny", "doc_to_text", "doc_to_image", "process_results"):
        setattr(figstep, name, _timed(getattr(figstep, name), timings, "task_code_s"))
    model_args = {"pretrained": model, **VLLM_KWARGS}
    model_args.pop("seed")  # lm-eval's own default is the same
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    with tempfile.TemporaryDirectory() as out:
        # As a user runs it, less --batch_size auto (rejalign's default for vLLM backends).
        argv = ["lm_eval", "--model", "vllm-vlm", "--model_args", args, "--apply_chat_template",
                "--tasks", TASK, "--gen_kwargs", f"max_gen_toks={max_tokens}",
                "--output_path", out]
        if n < 50:
            argv += ["--limit", str(n)]
        saved, sys.argv = sys.argv, argv
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            lm_eval.__main__.cli_evaluate()
        total = time.perf_counter() - t0
        sys.argv = saved
        [results_file] = Path(out).rglob("results_*.json")
        results = json.loads(results_file.read_text())
    return {
        **timings,
        "run_s": total - timings["load_s"],
        "batch_size": results["config"]["batch_size"],
        "asr": results["results"][TASK]["asr,none"],
    }


def phase_loop(model: str, n: int, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    processor, prompts, images = _prompts(model, n)
    t0 = time.perf_counter()
    lm = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    texts, tokens = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prompt, image in zip(prompts, images, strict=True):
            inputs = processor(text=prompt, images=image, return_tensors="pt")
            out = lm.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1] :]
            tokens.append(int(new.numel()))
            texts.append(processor.tokenizer.decode(new, skip_special_tokens=True))
    run = time.perf_counter() - t0
    return {"load_s": load, "run_s": run, "tokens": tokens, "texts": texts,
            "torch_threads": torch.get_num_threads()}


PHASES = {"raw": phase_raw, "lm_eval": phase_lm_eval, "loop": phase_loop}


def _run_phase(name: str, model: str, n: int, max_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [sys.executable, __file__, "--phase", name, "--model", model, "--prompts", str(n),
               "--max-tokens", str(max_tokens), "--result", result.name]
        env = {**VLLM_ENV, **os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"phase {name} failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(result.name).read_text())


def _best(values: list[float]) -> float:
    return min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a LLaVA folder vLLM can load (default: the tiny one)")
    parser.add_argument("--prompts", type=int, default=50, help="FigStep-Tiny prompts (<= 50)")
    parser.add_argument("--max-tokens", type=int, default=512, help="max new tokens (task: 512)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each way, interleaved; the best of each is compared")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        Path(args.result).write_text(json.dumps(PHASES[args.phase](args.model, args.prompts,
                                                                   args.max_tokens)))
        return

    runs: dict[str, list[dict]] = {name: [] for name in PHASES}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from rejalign_train.tiny import build_tiny_llava

            model = str(build_tiny_llava(Path(tmp) / "tiny-llava"))
        for _ in range(args.repeats):
            for name in PHASES:
                runs[name].append(_run_phase(name, model, args.prompts, args.max_tokens))

    med = {name: {key: _best([r[key] for r in rs]) for key in ("load_s", "run_s")}
           for name, rs in runs.items()}
    raw, ours, loop = runs["raw"][0], runs["lm_eval"][0], runs["loop"][0]
    print(f"{args.prompts} FigStep-Tiny prompts, max {args.max_tokens} new tokens, greedy, "
          f"float32; model {'tiny LLaVA (built)' if args.model is None else args.model}; "
          f"best of {args.repeats} interleaved runs of each way")
    print(f"{'way':<36}{'load s':>8}{'run s':>9}{'new tokens':>12}   runs (s)")
    rows = [("raw", "1 raw vllm.LLM.generate (all)"),
            ("lm_eval", f"2 lm_eval vllm-vlm (batch {ours['batch_size']})"),
            ("loop", f"3 transformers loop ({loop['torch_threads']} threads)")]
    for name, label in rows:
        each = " ".join(f"{r['run_s']:.2f}" for r in runs[name])
        print(f"{label:<36}{med[name]['load_s']:>8.2f}{med[name]['run_s']:>9.2f}"
              f"{sum(runs[name][0]['tokens']):>12}   {each}")
    gen = _best([r["generate_s"] for r in runs["lm_eval"]])
    rest = _best([r["run_s"] - r["generate_s"] for r in runs["lm_eval"]])
    task_code = _best([r["task_code_s"] for r in runs["lm_eval"]])
    share = 100 * task_code / med["raw"]["run_s"]
    print(f"   lm_eval: vLLM generate {gen:.2f} s, everything else {rest:.2f} s, of which our "
          f"task's code (data, images, scoring) {task_code:.2f} s ({share:.1f}% of raw)")
    overhead = med["lm_eval"]["run_s"] / med["raw"]["run_s"] - 1
    added = rest / med["raw"]["run_s"]
    speedup = med["loop"]["run_s"] / med["raw"]["run_s"]
    print(f"our task over raw vLLM, end to end (best runs): {100 * overhead:+.1f}%")
    print(f"our task over raw vLLM, time outside vLLM's generate: +{100 * added:.1f}%  "
          f"(target <= +10%: {'met' if added <= 0.10 else 'NOT met'})")
    print(f"vLLM batched vs one-at-a-time loop: {speedup:.1f}x  (target >= 5x: "
          f"{'met' if speedup >= 5 else 'NOT met'})")
    for ways in (["raw"], ["lm_eval"], ["raw", "lm_eval"]):
        texts = [r["texts"] for way in ways for r in runs[way]]
        stable = sum(len({t[i] for t in texts}) == 1 for i in range(args.prompts))
        print(f"completions identical across all {len(texts)} runs of {' and '.join(ways)}: "
              f"{stable}/{args.prompts}")
    differ = [i for i, (a, b) in enumerate(zip(raw["texts"], ours["texts"], strict=True)) if a != b]
    same_tokens = sum(a == b for a, b in zip(raw["tokens"], loop["tokens"], strict=True))
    print(f"raw and lm_eval completions identical: {args.prompts - len(differ)}/{args.prompts}; "
          f"raw and loop token counts equal: {same_tokens}/{args.prompts}")
    for i in differ:
        a, b = raw["texts"][i], ours["texts"][i]
        pairs = enumerate(zip(a, b, strict=False))
        at = next((k for k, (x, y) in pairs if x != y), min(len(a), len(b)))
        print(f"   prompt {i}: first difference at character {at} of {len(a)}/{len(b)} "
              f"(tokens {raw['tokens'][i]}/{ours['tokens'][i]})")


if __name__ == "__main__":
    main()
