"""Shared fixtures: tiny random models built offline, upstream data, and an lm_eval CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rejalign_tasks.benchmarks.data import DATA_DIR_ENV, DataUnavailableError, assemble_data_dir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Folder of upstream data files, laid out like the shared data copy.

    ``$REJALIGN_DATA_DIR`` when set (.ci/run points it at the shared copy). Otherwise a folder
    assembled from the download cache: the product's downloader fetches each pinned upstream
    file that the cache lacks and verifies its sha256 (``data.assemble_data_dir``); the folder is
    then exported as ``$REJALIGN_DATA_DIR`` so that product code and ``lm_eval`` subprocesses
    read the same files. Neither a copy nor the network: the run stops here with one message.
    """
    value = os.environ.get(DATA_DIR_ENV)
    if value:
        if not Path(value).is_dir():
            pytest.fail(
                f"{DATA_DIR_ENV}={value} is not a folder: point it at a copy of the upstream data "
                "files, or unset it to download the pinned files (see README, Development)",
                pytrace=False,
            )
        return Path(value)
    try:
        folder = assemble_data_dir(tmp_path_factory.mktemp("upstream-data"))
    except DataUnavailableError as exc:
        pytest.exit(
            f"upstream test data unavailable.\n{exc}", returncode=pytest.ExitCode.USAGE_ERROR
        )
    os.environ[DATA_DIR_ENV] = str(folder)
    return folder


@pytest.fixture(scope="module")
def torch_one_thread():
    """Training tests run torch on one thread: steadier on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from rejalign_train.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_lora_adapter(tiny_llava, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny LLaVA's language-model q_proj/v_proj with non-zero weights,
    so that applying it visibly changes the completions."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=2.0)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    from rejalign_train.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


def run_lm_eval(args: list[str], output_path: Path, *, env: dict | None = None, timeout: int = 900):
    """Run the real ``lm_eval`` CLI in a subprocess; return (completed process, results, samples).

    ``samples`` maps task name to its list of logged samples.
    """
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        *args,
        "--output_path",
        str(output_path),
        "--log_samples",
    ]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    results, samples = None, {}
    result_files = sorted(output_path.rglob("results_*.json"))
    if result_files:
        results = json.loads(result_files[-1].read_text())
        for f in output_path.rglob("samples_*.jsonl"):
            task = f.name[len("samples_") :].rsplit("_", 1)[0]
            samples[task] = [json.loads(line) for line in f.read_text().splitlines() if line]
    return proc, results, samples


@pytest.fixture
def lm_eval_cli():
    return run_lm_eval
