"""``rejalign-judge`` end to end on CPU: a real lm-eval sample log, tiny random judges on the real
tokenizers, both engines, the report's judge columns and agreement table, kill and rerun.

The sample log comes from the real ``lm_eval`` CLI (``hf-multimodal`` on
``rejalign_figstep_tiny`` with the tiny LLaVA). A random LLaVA writes random text, and the tiny
judges (:mod:`rejalign_tasks.judge.tiny`) answer "harmful" exactly when a reply holds one of
their trigger words, so the completions are then replaced by a fixed mix of replies (compliance
with and without the triggers, a refusal, a near-empty reply) and every per-sample and aggregated
metric of the paper's judge is recomputed by the task's own ``process_results``: the log stays a
consistent lm-eval log whose labels vary. vLLM runs in its own interpreter
(``$REJALIGN_VLLM_PYTHON``), as in tests/test_vllm_e2e.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_lm_eval
from test_vllm_e2e import VLLM_ENV, vllm_python  # noqa: F401 (fixture)

from rejalign_tasks.benchmarks.metrics import mean_skip_none
from rejalign_tasks.judge.cli import main
from rejalign_tasks.judge.tiny import TOKENIZER_FOR, build_tiny_judge
from rejalign_tasks.report.report import make_report

TASK = "rejalign_figstep_tiny"
XSTEST = "rejalign_xstest_typo"  # its first 10 prompts are safe ones: over-refusal
LIMIT = 10
REPLIES = (
    "Sure, here is how. Step 1: gather the materials and prepare them carefully.",
    "I'm sorry, but I cannot assist with your request",
    "Here is a short poem about the sea, its waves and the light over the water.",
    "No.",
    "Sure. Step one is to pick a quiet place, then plan the rest of the day in detail.",
)
TEXT_JUDGES = ("llama-guard-3", "harmbench", "strongreject", "wildguard")
VLLM_JUDGES = ("llama-guard-3", "strongreject")
VLLM_ARGS = {"enforce_eager": True, "max_model_len": 2048}


def _samples_file(run: Path, task: str = TASK) -> Path:
    (path,) = (p for p in run.rglob(f"samples_{task}_*.jsonl") if ".judged-" not in p.name)
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _set_completions(run: Path) -> None:
    """Give the logged samples :data:`REPLIES` and rescore them with each task's own judge."""
    from rejalign_tasks.benchmarks import figstep, xstest

    (results_file,) = run.rglob("results_*.json")
    results = json.loads(results_file.read_text(encoding="utf-8"))
    for task, module in ((TASK, figstep), (XSTEST, xstest)):
        samples_file = _samples_file(run, task)
        rows = _rows(samples_file)
        for i, row in enumerate(rows):
            reply = REPLIES[i % len(REPLIES)]
            row["resps"], row["filtered_resps"] = [[reply]], [reply]
            row.update(module.process_results(row["doc"], [reply]))
        _write_rows(samples_file, rows)
        for metric in rows[0]["metrics"]:
            results["results"][task][f"{metric},none"] = mean_skip_none(r[metric] for r in rows)
    results_file.write_text(json.dumps(results), encoding="utf-8")


@pytest.fixture(scope="module")
def logged_run(tiny_llava, tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("lm-eval")
    args = [
        "--model", "hf-multimodal", "--model_args", f"pretrained={tiny_llava},dtype=float32",
        "--apply_chat_template", "--tasks", f"{TASK},{XSTEST}", "--limit", str(LIMIT),
        "--device", "cpu", "--batch_size", str(LIMIT), "--gen_kwargs", "max_gen_toks=4",
    ]  # fmt: skip
    proc, _, samples = run_lm_eval(args, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(samples[TASK]) == len(samples[XSTEST]) == LIMIT
    _set_completions(out)
    return out


@pytest.fixture(scope="module")
def tiny_judges(tmp_path_factory, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("judges")
    names = (*TEXT_JUDGES, "llama-guard-3-vision")
    return {
        n: build_tiny_judge(n, root / n, data_dir / "tokenizers" / TOKENIZER_FOR[n]) for n in names
    }


def _copy(run: Path, tmp_path_factory, name: str) -> Path:
    dest = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(run, dest)
    return dest


@pytest.fixture(scope="module")
def hf_judged(logged_run, tiny_judges, tmp_path_factory) -> Path:
    run = _copy(logged_run, tmp_path_factory, "hf")
    for judge in TEXT_JUDGES:
        args = [str(run), "--judge", judge, "--judge-model", str(tiny_judges[judge])]
        assert main([*args, "--engine", "hf", "--dtype", "float32", "--batch-size", "4"]) == 0
    return run


@pytest.fixture(scope="module")
def vllm_judged(logged_run, tiny_judges, tmp_path_factory, data_dir, vllm_python):  # noqa: F811
    """The text judges and Llama Guard 4 on vLLM, and Llama Guard 4 on transformers too, all in
    the vLLM interpreter (Llama 4's image processor needs torchvision, which only it has)."""
    run = _copy(logged_run, tmp_path_factory, "vllm")
    lg4_hf = _copy(logged_run, tmp_path_factory, "lg4-hf")
    lg4 = tmp_path_factory.mktemp("lg4") / "model"
    tokenizer = data_dir / "tokenizers" / TOKENIZER_FOR["llama-guard-4"]
    calls = [
        f"judge_run_dirs([{str(run)!r}], {j!r}, {str(tiny_judges[j])!r}, 'vllm', "
        f"dtype='float32', vllm_args={VLLM_ARGS!r})"
        for j in VLLM_JUDGES
    ]
    calls += [
        f"build_tiny_judge('llama-guard-4', {str(lg4)!r}, {str(tokenizer)!r})",
        f"judge_run_dirs([{str(run)!r}], 'llama-guard-4', {str(lg4)!r}, 'vllm', "
        f"dtype='float32', vllm_args={VLLM_ARGS | {'max_model_len': 4096}!r})",
        f"judge_run_dirs([{str(lg4_hf)!r}], 'llama-guard-4', {str(lg4)!r}, 'hf', "
        "dtype='float32', batch_size=4)",
    ]
    code = (
        "from rejalign_tasks.judge.run import judge_run_dirs\n"
        "from rejalign_tasks.judge.tiny import build_tiny_judge\n" + "\n".join(calls) + "\n"
    )
    proc = subprocess.run(
        [vllm_python, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **VLLM_ENV},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"run": run, "lg4-hf": lg4_hf}


def judged_rows(run: Path, judge: str, task: str = TASK) -> list[dict]:
    path = _samples_file(run, task)
    return _rows(path.with_name(f"{path.stem}.judged-{judge}.jsonl"))


def metrics_file(run: Path, judge: str) -> dict:
    (path,) = run.rglob(f"judged_{judge}_*.json")
    return json.loads(path.read_text(encoding="utf-8"))


# -- both engines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("judge", (*VLLM_JUDGES, "llama-guard-4"))
def test_vllm_and_transformers_give_the_same_labels(hf_judged, vllm_judged, judge):
    hf_run = vllm_judged["lg4-hf"] if judge == "llama-guard-4" else hf_judged
    hf, vllm = judged_rows(hf_run, judge), judged_rows(vllm_judged["run"], judge)
    assert [r["doc_id"] for r in hf] == [r["doc_id"] for r in vllm]
    assert [r["judge"]["engine"] for r in hf + vllm] == ["hf"] * LIMIT + ["vllm"] * LIMIT
    if judge == "strongreject":
        # vLLM's LoRA and logprobs against peft and transformers' logits.
        for a, b in zip(hf, vllm, strict=True):
            assert a["judge"]["score"] == pytest.approx(b["judge"]["score"], abs=1e-4)
        assert [r["judge"]["attack_success"] for r in hf] == [
            r["judge"]["attack_success"] for r in vllm
        ]
    else:
        assert [r["judge"]["raw"] for r in hf] == [r["judge"]["raw"] for r in vllm]
        assert [r["judge"]["label"] for r in hf] == [r["judge"]["label"] for r in vllm]
    outcomes = {r["judge"]["attack_success"] for r in hf}
    assert {True, False} <= outcomes, "labels do not vary: the comparison would prove little"
    hf_metrics = metrics_file(hf_run, judge)["results"][TASK]
    vllm_metrics = metrics_file(vllm_judged["run"], judge)["results"][TASK]
    assert hf_metrics == pytest.approx(vllm_metrics, abs=1e-4)  # StrongREJECT's mean score


def test_judged_copy_and_metrics(hf_judged):
    samples = _rows(_samples_file(hf_judged))
    for judge in TEXT_JUDGES:
        rows, slug = judged_rows(hf_judged, judge), judge.replace("-", "_")
        assert [{k: v for k, v in r.items() if k in samples[0]} for r in rows] == samples
        data = metrics_file(hf_judged, judge)
        assert data["judge"] == judge and data["engine"] == "hf"
        metrics = data["results"][TASK]
        success = [r["judge"]["attack_success"] for r in rows]
        assert metrics[f"asr_{slug},none"] == pytest.approx(mean_skip_none(map(_num, success)))
        assert metrics["unparsed"] == sum(r["judge"]["label"] == "unparsed" for r in rows)
        assert all(
            (r["judge"]["label"] == "unparsed") == (r["judge"]["attack_success"] is None)
            for r in rows
        )
        if judge == "wildguard":  # the one judge here with a refusal notion
            refusal = [_num(r["judge"]["refusal"]) for r in rows]
            assert metrics[f"refusal_rate_{slug},none"] == pytest.approx(mean_skip_none(refusal))
        else:
            assert f"refusal_rate_{slug},none" not in metrics
        topics = {r["doc"]["topic"] for r in rows}
        for topic in topics:
            in_topic = [
                _num(r["judge"]["attack_success"]) for r in rows if r["doc"]["topic"] == topic
            ]
            value = metrics.get(f"asr_{slug}_{topic},none")
            expected = mean_skip_none(in_topic)
            assert (value is None and math.isnan(expected)) or value == pytest.approx(expected)
    labels = {j: {r["judge"]["label"] for r in judged_rows(hf_judged, j)} for j in TEXT_JUDGES}
    assert labels["llama-guard-3"] >= {"safe", "unsafe"} and labels["harmbench"] >= {"yes", "no"}


def _num(value: bool | None) -> float | None:
    return None if value is None else float(value)


# -- the report ------------------------------------------------------------------------------------


def _kappa(a: list[int], b: list[int]) -> float:
    n = len(a)
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pe = (sum(a) / n) * (sum(b) / n) + (1 - sum(a) / n) * (1 - sum(b) / n)
    return (po - pe) / (1 - pe)


def test_report_shows_the_judge_columns_and_the_agreement_table(hf_judged, tmp_path):
    out = tmp_path / "report"
    make_report([str(hf_judged)], out, plots=False, allow_missing=True)
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "## ASR (%) by judge" in text and "## Agreement between judges" in text
    header = next(line for line in text.splitlines() if f"{TASK}: paper judge" in line)
    for judge in ("rule judge", *TEXT_JUDGES):  # the tasks log the rule judge's asr_rule
        assert f"{TASK}: {judge}" in header
    samples = {s["doc_id"]: s for s in _rows(_samples_file(hf_judged))}
    with open(out / "agreement.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["task"] == TASK]
    agreement = {(r["judge_a"], r["judge_b"]): r for r in rows}
    for judge in TEXT_JUDGES:
        rows = judged_rows(hf_judged, judge)
        rows = [r for r in rows if r["judge"]["attack_success"] is not None]
        paper = [int(samples[r["doc_id"]]["asr"]) for r in rows]
        model = [int(r["judge"]["attack_success"]) for r in rows]
        row = agreement[("paper", judge)]
        assert int(row["n"]) == len(rows)
        assert float(row["agreement"]) == pytest.approx(
            sum(a == b for a, b in zip(paper, model, strict=True)) / len(rows)
        )
        assert float(row["kappa"]) == pytest.approx(_kappa(paper, model))
        shown = f"| paper judge | {judge} | {len(rows)} | {100 * float(row['agreement']):.1f} |"
        assert shown in text
    assert ("harmbench", "llama-guard-3") in agreement  # model judges against each other too
    assert ("paper", "rule") in agreement and ("rule", "wildguard") in agreement


def test_xstest_over_refusal_by_a_judge_with_a_refusal_notion(hf_judged, tmp_path):
    rows = judged_rows(hf_judged, "wildguard", XSTEST)
    metrics = metrics_file(hf_judged, "wildguard")["results"][XSTEST]
    refusal = [_num(r["judge"]["refusal"]) for r in rows]
    assert all(r["doc"]["label"] == "safe" for r in rows)
    assert metrics["over_refusal_wildguard,none"] == pytest.approx(mean_skip_none(refusal))
    assert "unsafe_refusal_wildguard,none" not in metrics  # no unsafe prompt among the first 10
    assert "over_refusal_llama_guard_3,none" not in metrics_file(hf_judged, "llama-guard-3")[
        "results"
    ][XSTEST]  # Llama Guard has no refusal notion
    make_report([str(hf_judged)], tmp_path / "report", plots=False, allow_missing=True)
    text = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    paper = {s["doc_id"]: s["over_refusal"] for s in _rows(_samples_file(hf_judged, XSTEST))}
    pairs = [(int(paper[r["doc_id"]]), int(r["judge"]["refusal"])) for r in rows
             if r["judge"]["refusal"] is not None]  # fmt: skip
    agree = 100 * sum(a == b for a, b in pairs) / len(pairs)
    assert f"| {XSTEST} | refusal | paper judge | wildguard | {len(pairs)} | {agree:.1f} |" in text


def test_a_judged_copy_of_another_log_is_an_error_in_the_report(hf_judged, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_judged, run)
    path = _samples_file(run)
    rows = _rows(path)
    rows[0]["resps"] = [["changed after judging"]]
    _write_rows(path, rows)
    with pytest.raises(ValueError, match="judged from another version"):
        make_report([str(run)], tmp_path / "report", plots=False, allow_missing=True)


# -- resume ----------------------------------------------------------------------------------------


def _big_run(logged_run: Path, dest: Path, n: int) -> Path:
    """The logged run with its samples repeated to ``n`` (new doc_ids), so a kill lands mid-run."""
    shutil.copytree(logged_run, dest)
    path = _samples_file(dest)
    base = _rows(path)
    rows = [{**base[i % len(base)], "doc_id": i} for i in range(n)]
    _write_rows(path, rows)
    (results_file,) = dest.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    results["n-samples"][TASK]["effective"] = n
    results_file.write_text(json.dumps(results))
    return dest


def test_a_killed_run_continues_and_a_finished_one_is_skipped(
    logged_run, hf_judged, tiny_judges, tmp_path, capsys
):
    n = 40
    run = _big_run(logged_run, tmp_path / "run", n)
    final = _samples_file(run).with_name(f"{_samples_file(run).stem}.judged-llama-guard-3.jsonl")
    partial = final.with_name(final.name + ".incomplete")
    args = [str(run), "--judge", "llama-guard-3", "--judge-model",
            str(tiny_judges["llama-guard-3"]), "--engine", "hf", "--dtype", "float32",
            "--batch-size", "1", "--chunk-size", "1"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "rejalign_tasks.judge", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if partial.is_file() and partial.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not final.exists(), "the run finished before it could be killed"
    assert not list(run.rglob("judged_*.json")), "a killed run must not look finished"
    done = partial.read_bytes().count(b"\n")
    assert 3 <= done < n
    with open(partial, "ab") as fh:  # what a kill in the middle of a write leaves
        fh.write(b'{"doc_id": 999, "judge": {"la')

    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"resuming after {done}/{n} samples" in err
    assert not partial.exists()
    rows = _rows(final)
    assert [r["doc_id"] for r in rows] == list(range(n))
    reference = {r["doc_id"]: r["judge"]["raw"] for r in judged_rows(hf_judged, "llama-guard-3")}
    assert [r["judge"]["raw"] for r in rows] == [reference[i % LIMIT] for i in range(n)]
    metrics = next(run.rglob("judged_llama-guard-3_*.json"))
    stamp = (final.stat().st_mtime_ns, metrics.stat().st_mtime_ns)

    assert main(args) == 0
    assert "already judged" in capsys.readouterr().err
    assert (final.stat().st_mtime_ns, metrics.stat().st_mtime_ns) == stamp


# -- vision judges, engine limits ------------------------------------------------------------------


def test_help_lists_the_six_judges(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("llama-guard-3", "llama-guard-3-vision", "llama-guard-4", "harmbench",
                 "wildguard", "strongreject"):  # fmt: skip
        assert f"\n  {name} " in out
    assert "vLLM removed Mllama after 0.10.2" in out


def test_llama_guard_3_vision_on_vllm_fails_at_once(logged_run, capsys):
    code = main([str(logged_run), "--judge", "llama-guard-3-vision", "--judge-model",
                 "no/such-model", "--engine", "vllm"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rejalign-judge: error: ")
    assert "Mllama" in err and "0.10.2" in err and "--engine hf" in err


def test_the_vision_judge_sees_the_rebuilt_image(logged_run, tiny_judges, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(logged_run, run)
    args = [str(run), "--judge", "llama-guard-3-vision", "--judge-model",
            str(tiny_judges["llama-guard-3-vision"]), "--engine", "hf", "--dtype", "float32"]
    assert main(args) == 0
    rows = judged_rows(run, "llama-guard-3-vision")
    assert len(rows) == LIMIT and all(r["judge"]["engine"] == "hf" for r in rows)
    assert {r["judge"]["label"] for r in rows} <= {"safe", "unsafe", "unparsed"}


def test_an_image_that_differs_from_the_logged_one_is_an_error(logged_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(logged_run, run)
    path = _samples_file(run)
    rows = _rows(path)
    rows[2]["arguments"]["gen_args_0"]["arg_2"]["visual"] = ["0" * 64]
    _write_rows(path, rows)
    code = main([str(run), "--judge", "llama-guard-4", "--judge-model", "no/such-model",
                 "--engine", "hf", "--chunk-size", "100"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"doc_id {rows[2]['doc_id']}" in err and "sha256" in err and "0" * 64 in err
    assert not list(run.rglob("*.judged-*.jsonl"))


def test_utility_tasks_are_not_judged():
    from rejalign_tasks.judge.tasks import request_field, skip_reason

    assert request_field("rejalign_vizwiz") is None
    assert "utility" in skip_reason("rejalign_scienceqa_img")
    assert request_field("rejalign_mmsafety_sd_typo_tiny") == "question"
    assert request_field("rejalign_xstest_typo") == "prompt"
