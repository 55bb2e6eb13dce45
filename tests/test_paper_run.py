"""One run for the paper's table: modality routing, ``rejalign-eval``, groups, and an adapter.

lm-eval cannot mix text-only and image tasks in one hf-multimodal run. These tests show that it
still cannot (so the mend stays needed), that the routed backend answers a mixed run exactly as
separate text-only and image-only runs of lm-eval answer it (with the adapter applied to both),
and that ``rejalign-eval`` runs the whole ``rejalign_paper`` group with a LoRA adapter on the
tiny model and leaves one results folder. Used both ways: from Python (``install()`` then
``simple_evaluate``) and as the ``rejalign-eval`` command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rejalign_tasks.console import UsageError
from rejalign_tasks.harness.cli import build_argv, main
from rejalign_tasks.harness.routing import has_images, install, route, uninstall

FIXTURES = Path(__file__).parent / "fixtures" / "utility"
UTILITY_METADATA = {
    "scienceqa_data_files": str(FIXTURES / "scienceqa_img_test.parquet"),
    "vizwiz_data_files": str(FIXTURES / "vizwiz_val.parquet"),
}
PAPER_TASKS = {
    "rejalign_figstep": False,
    "rejalign_mmsafety_sd_typo": False,
    "rejalign_xstest": True,  # text-only
    "rejalign_xstest_typo": False,
    "rejalign_scienceqa_img": False,
    "rejalign_vizwiz": False,
}
PAPER_GROUPS = {
    "rejalign_paper": ["rejalign_safety", "rejalign_overrefusal", "rejalign_utility"],
    "rejalign_safety": ["rejalign_figstep", "rejalign_mmsafety_sd_typo"],
    "rejalign_overrefusal": ["rejalign_xstest", "rejalign_xstest_typo"],
    "rejalign_utility": ["rejalign_scienceqa_img", "rejalign_vizwiz"],
}
LIMIT = 2
GEN = {"max_gen_toks": 8}


# --------------------------------------------------------------------------- command line


def test_build_argv_fills_in_the_paper_run_defaults():
    assert build_argv(["--model_args", "pretrained=m", "--output_path", "out"]) == [
        "run",
        "--model_args",
        "pretrained=m",
        "--output_path",
        "out",
        "--model",
        "hf-multimodal",
        "--tasks",
        "rejalign_paper",
        "--apply_chat_template",
        "--log_samples",
    ]


def test_build_argv_keeps_what_the_user_gave():
    argv = [
        "run",
        "--model=vllm-vlm",
        "-t",
        "rejalign_xstest",
        "--apply_chat_template",
        "-s",
        "-o",
        "out",
    ]
    assert build_argv(argv) == argv
    assert build_argv(["--no_chat_template", "-o", "o"])[-3:] == [
        "--tasks",
        "rejalign_paper",
        "--log_samples",
    ]
    assert "--apply_chat_template" not in build_argv(["--no_chat_template", "-o", "o"])
    # A config file may name model, tasks and output itself; other subcommands pass through.
    assert build_argv(["--config", "c.yaml"]) == [
        "run",
        "--config",
        "c.yaml",
        "--apply_chat_template",
        "--log_samples",
    ]
    assert build_argv(["ls", "tasks"]) == ["ls", "tasks"]
    assert build_argv(["--predict_only", "-o", "o"]).count("--log_samples") == 0


def test_build_argv_requires_an_output_folder(capsys):
    with pytest.raises(UsageError, match="--output_path is required"):
        build_argv(["--model_args", "pretrained=m"])
    assert main(["--model_args", "pretrained=m"]) == 2
    assert capsys.readouterr().err.strip() == (
        "rejalign-eval: error: --output_path is required (the folder that will hold the "
        "results JSON and every task's samples)"
    )


def test_every_group_names_known_tasks_and_sets_no_group_score(task_manager):
    import yaml

    folder = Path(__file__).parent.parent / "task_configs" / "groups"
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")}
    assert set(configs) == {*PAPER_GROUPS, "rejalign_safety_text", "rejalign_vlguard"}
    for name, config in configs.items():
        assert config["group"] == name and "aggregate_metric_list" not in config
        assert all(t in task_manager.all_tasks for t in config["task"]), name
        if name in PAPER_GROUPS:
            assert config["task"] == PAPER_GROUPS[name]
    assert configs["rejalign_safety_text"]["task"] == [
        "rejalign_figstep_text",
        "rejalign_mmsafety_text",
    ]
    assert configs["rejalign_vlguard"]["task"] == [
        f"rejalign_vlguard_{subset}" for subset in ("unsafes", "safe_unsafes", "safe_safes")
    ]


# --------------------------------------------------------------------------- routing


def _instance(i: int, visual: list | None):
    from lm_eval.api.instance import Instance

    args = (f"ctx{i}", {"max_gen_toks": 1}) + (() if visual is None else ({"visual": visual},))
    return Instance("generate_until", {}, args, idx=0, metadata=("t", i, 1))


def test_route_splits_by_modality_and_restores_the_order():
    image = Image.new("RGB", (4, 4))
    requests = [
        _instance(0, None),
        _instance(1, [image]),
        _instance(2, []),  # a multimodal task's doc without images counts as text
        _instance(3, [image]),
    ]
    calls = []

    def backend(batch, disable_tqdm=False):
        calls.append([(r.args[0], len(r.args)) for r in batch])
        return [r.args[0].upper() for r in batch]

    assert route(backend, requests) == ["CTX0", "CTX1", "CTX2", "CTX3"]
    assert calls == [[("ctx1", 3), ("ctx3", 3)], [("ctx0", 2), ("ctx2", 2)]]
    assert [has_images(r) for r in requests] == [False, True, False, True]

    calls.clear()  # one kind only: a single call, as without routing
    assert route(backend, requests[1::2]) == ["CTX1", "CTX3"]
    assert calls == [[("ctx1", 3), ("ctx3", 3)]]


# --------------------------------------------------------------------------- Python API


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _evaluate(task_manager, tasks: list[str], model_args: dict) -> dict[str, list[str]]:
    """simple_evaluate in this process; the completions per task, in document order."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model="hf-multimodal",
        model_args={**model_args, "dtype": "float32"},
        tasks=tasks,
        limit=LIMIT,
        device="cpu",
        batch_size=1,
        apply_chat_template=True,
        gen_kwargs=dict(GEN),
        log_samples=True,
        task_manager=task_manager,
    )
    assert results["config"]["model"] == "hf-multimodal"
    return {
        task: [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()
    }


@pytest.fixture(scope="module")
def separate_runs(tiny_llava, tiny_lora_adapter, task_manager, data_dir) -> dict[str, dict]:
    """Plain lm-eval (no routing): text-only and image-only runs, with and without the adapter."""
    uninstall()
    with_adapter = {"pretrained": str(tiny_llava), "peft": str(tiny_lora_adapter)}
    return {
        "adapter": {
            **_evaluate(task_manager, ["rejalign_xstest"], with_adapter),
            **_evaluate(task_manager, ["rejalign_xstest_typo"], with_adapter),
        },
        "base": _evaluate(task_manager, ["rejalign_xstest"], {"pretrained": str(tiny_llava)}),
    }


def test_plain_lm_eval_cannot_mix_text_and_image_tasks(tiny_llava, task_manager, data_dir):
    uninstall()
    # Which message depends on which kind of request comes first ("not enough"/"too many").
    with pytest.raises(ValueError, match="values to unpack"):
        _evaluate(
            task_manager,
            ["rejalign_xstest", "rejalign_xstest_typo"],
            {"pretrained": str(tiny_llava)},
        )


def test_routed_mixed_run_answers_like_separate_runs(
    tiny_llava, tiny_lora_adapter, task_manager, separate_runs, data_dir
):
    install()
    try:
        mixed = _evaluate(
            task_manager,
            ["rejalign_xstest", "rejalign_xstest_typo"],
            {"pretrained": str(tiny_llava), "peft": str(tiny_lora_adapter)},
        )
    finally:
        uninstall()
    assert mixed == separate_runs["adapter"]
    # The adapter reaches the text-only requests too: without it they are answered otherwise.
    assert mixed["rejalign_xstest"] != separate_runs["base"]["rejalign_xstest"]


# --------------------------------------------------------------------------- rejalign-eval


@pytest.fixture(scope="module")
def sd_images(tmp_path_factory, data_dir) -> Path:
    """Stand-ins for MM-SafetyBench's SD images (not redistributable) in the upstream layout."""
    from rejalign_tasks.benchmarks.data import MMSAFETY_SCENARIOS
    from rejalign_tasks.benchmarks.mmsafetybench import read_questions

    root = tmp_path_factory.mktemp("mmsafety") / "imgs"
    image = Image.new("RGB", (24, 24), (90, 140, 60))
    for scenario in MMSAFETY_SCENARIOS:
        folder = root / scenario / "SD"
        folder.mkdir(parents=True)
        for qid in read_questions(scenario):
            image.save(folder / f"{qid}.jpg")
    return root


def _rejalign_eval(args: list[str], **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **env_vars}
    cmd = [sys.executable, "-m", "rejalign_tasks.harness.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)


def test_paper_run_with_adapter_leaves_one_results_folder(
    tiny_llava, tiny_lora_adapter, sd_images, separate_runs, tmp_path, data_dir
):
    out = tmp_path / "results"
    proc = _rejalign_eval(
        [
            "--model_args",
            f"pretrained={tiny_llava},peft={tiny_lora_adapter},dtype=float32",
            "--device",
            "cpu",
            "--limit",
            str(LIMIT),
            "--gen_kwargs",
            "max_gen_toks=8",
            "--metadata",
            json.dumps(UTILITY_METADATA),
            "--output_path",
            str(out),
        ],
        REJALIGN_MMSAFETY_IMAGE_DIR=str(sd_images),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    [folder] = [p for p in out.iterdir() if p.is_dir()]  # one folder for the whole table
    [results_file] = folder.glob("results_*.json")
    stamp = results_file.name[len("results_") : -len(".json")]
    assert f"rejalign-eval: results and samples in {folder}" in proc.stdout
    assert sorted(p.name for p in folder.glob("samples_*.jsonl")) == sorted(
        f"samples_{task}_{stamp}.jsonl" for task in PAPER_TASKS
    )

    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "hf-multimodal"
    assert results["config"]["model_args"]["peft"] == str(tiny_lora_adapter)
    assert results["group_subtasks"] == PAPER_GROUPS
    for group in PAPER_GROUPS:  # groups organise; they never average unlike metrics
        assert set(results["results"][group]) == {"alias", "name"}
    for task, text_only in PAPER_TASKS.items():
        assert results["n-samples"][task]["effective"] == LIMIT
        lines = (folder / f"samples_{task}_{stamp}.jsonl").read_text().splitlines()
        samples = [json.loads(line) for line in lines]
        assert len(samples) == LIMIT
        for sample in samples:
            args = sample["arguments"]["gen_args_0"]
            assert args["arg_0"].startswith("USER: ") and args["arg_0"].endswith(" ASSISTANT:")
            assert ("arg_2" not in args) is text_only
        answers = [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
        if task in separate_runs["adapter"]:
            # The same answers as plain lm-eval's separate runs with the same adapter.
            assert answers == separate_runs["adapter"][task], task
