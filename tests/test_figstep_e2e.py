"""FigStep tasks through the real ``lm_eval`` CLI on tiny random models built offline."""

from __future__ import annotations

import pytest

from rejalign_tasks.benchmarks.figstep import (
    FIGSTEP_PROMPT,
    FIGSTEP_PROMPT_OFFICIAL_SCRIPT,
    TOPIC_SLUGS,
)

COMMON = ["--device", "cpu", "--gen_kwargs", "max_gen_toks=12"]


def _hf_multimodal(model: str, extra_model_args: str = "") -> list[str]:
    args = f"pretrained={model},dtype=float32" + (
        f",{extra_model_args}" if extra_model_args else ""
    )
    return ["--model", "hf-multimodal", "--model_args", args, "--apply_chat_template"]


def _check_figstep_results(results: dict, samples: list[dict], n: int) -> None:
    task = results["results"]["rejalign_figstep_tiny"]
    assert task["sample_len"] == n
    for metric in ("asr", "refusal_rate", "partial_refusal_rate"):
        assert 0.0 <= task[f"{metric},none"] <= 1.0
    assert (
        pytest.approx(
            task["asr,none"] + task["refusal_rate,none"] + task["partial_refusal_rate,none"]
        )
        == 1.0
    )
    for topic in TOPIC_SLUGS:
        per_topic = [s["asr"] for s in samples if s["doc"]["topic"] == topic]
        assert task[f"asr_{topic},none"] == pytest.approx(sum(per_topic) / len(per_topic))
    assert task["asr,none"] == pytest.approx(sum(s["asr"] for s in samples) / n)
    assert task["asr_rule,none"] == pytest.approx(sum(s["asr_rule"] for s in samples) / n)
    assert len(samples) == n
    for sample in samples:
        prompt, gen_kwargs, visuals = sample["arguments"]["gen_args_0"].values()
        assert FIGSTEP_PROMPT in prompt and prompt.startswith("USER: <image>\n")
        assert len(visuals["visual"]) == 1  # one image per request, logged by its hash
        assert gen_kwargs["until"] == [] and gen_kwargs["do_sample"] is False
        assert sample["doc"]["font_file"].endswith("FreeMonoBold.ttf")
        assert len(sample["doc"]["font_sha256"]) == 64


def test_figstep_tiny_hf_multimodal(tiny_llava, lm_eval_cli, tmp_path, data_dir):
    proc, results, samples = lm_eval_cli(
        [
            *_hf_multimodal(str(tiny_llava)),
            "--tasks",
            "rejalign_figstep_tiny",
            *COMMON,
            "--batch_size",
            "10",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_figstep_results(results, samples["rejalign_figstep_tiny"], 50)


def test_figstep_tiny_with_lora_adapter(
    tiny_llava, tiny_lora_adapter, lm_eval_cli, tmp_path, data_dir
):
    """peft= loads a LoRA adapter; an adapter with non-zero weights changes the completions."""
    adapter = tiny_lora_adapter

    base_proc, _, base_samples = lm_eval_cli(
        [
            *_hf_multimodal(str(tiny_llava)),
            "--tasks",
            "rejalign_figstep_tiny",
            *COMMON,
            "--limit",
            "5",
            "--batch_size",
            "5",
        ],
        tmp_path / "base",
    )
    proc, results, samples = lm_eval_cli(
        [
            *_hf_multimodal(str(tiny_llava), f"peft={adapter}"),
            "--tasks",
            "rejalign_figstep_tiny",
            *COMMON,
            "--limit",
            "5",
            "--batch_size",
            "5",
        ],
        tmp_path / "lora",
    )
    assert base_proc.returncode == 0 and proc.returncode == 0, proc.stderr[-3000:]
    assert results["config"]["model_args"]["peft"] == str(adapter)
    assert results["results"]["rejalign_figstep_tiny"]["sample_len"] == 5
    base = [s["resps"] for s in base_samples["rejalign_figstep_tiny"]]
    lora = [s["resps"] for s in samples["rejalign_figstep_tiny"]]
    assert base != lora


def test_image_task_with_text_model_fails_with_lm_eval_error(
    tiny_lm, lm_eval_cli, tmp_path, data_dir
):
    proc, results, _ = lm_eval_cli(
        [
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny_lm}",
            "--tasks",
            "rejalign_figstep",
            *COMMON,
            "--limit",
            "2",
        ],
        tmp_path,
    )
    assert proc.returncode != 0 and results is None
    assert "require multimodal input" in proc.stderr
    assert "rejalign_tasks" not in proc.stderr.split("Traceback")[-1].split("\n")[-2]


def test_text_baseline_with_text_model(tiny_lm, lm_eval_cli, tmp_path, data_dir):
    proc, results, samples = lm_eval_cli(
        [
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny_lm},dtype=float32",
            "--tasks",
            "rejalign_figstep_text",
            "--apply_chat_template",
            *COMMON,
            "--limit",
            "20",
            "--batch_size",
            "20",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    task = results["results"]["rejalign_figstep_text"]
    assert task["sample_len"] == 20 and "asr,none" in task
    for sample in samples["rejalign_figstep_text"]:
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        assert sample["doc"]["question"] in prompt and "<image>" not in prompt
        assert "arg_2" not in sample["arguments"]["gen_args_0"]  # no image


def test_official_script_prompt_variant(tiny_llava, lm_eval_cli, tmp_path, data_dir):
    proc, _, samples = lm_eval_cli(
        [
            *_hf_multimodal(str(tiny_llava)),
            "--tasks",
            "rejalign_figstep_tiny",
            *COMMON,
            "--limit",
            "2",
            "--metadata",
            '{"prompt_variant": "official_script"}',
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sample in samples["rejalign_figstep_tiny"]:
        assert FIGSTEP_PROMPT_OFFICIAL_SCRIPT in sample["arguments"]["gen_args_0"]["arg_0"]
