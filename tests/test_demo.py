"""``rejalign-demo --quick`` end to end, run as a user runs it: the toy model is built, the real
sweep (mix, fit, lm-eval, report) runs, and the report shows the paper's effect.

Every number is read from the files the demo wrote (the report's CSV tables, the step markers),
never from its printed output.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rejalign_train.demo.cli import SWEEP_DIR
from rejalign_train.demo.sources import ASR_HEADER

SYNTHETIC = "SYNTHETIC DEMONSTRATION"


def run_demo(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "rejalign_train.demo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def _table(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["model"]: row for row in csv.DictReader(fh)}


def _markers(sweep: Path) -> dict[str, str]:
    return {
        str(p.parent.relative_to(sweep)): json.loads(p.read_text())["finished"]
        for p in sorted(sweep.rglob("rejalign_step.json"))
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = run_demo("--quick", "--output-dir", str(out))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return out


def test_report_and_figure_show_refusals_lower_figstep_asr(demo):
    report = demo / SWEEP_DIR / "report"
    assert (report / "report.md").is_file()
    with Image.open(report / "asr_vs_refusal_fraction.png") as image:
        image.verify()
    assert (report / "asr_vs_refusal_fraction.svg").stat().st_size > 0

    table = _table(report / "table_main.csv")
    assert list(table) == ["base", "frac-0.00", "frac-1.00"]
    base = float(table["base"][ASR_HEADER])
    top = max((r for r in table.values() if r["refusal_fraction"]),
              key=lambda r: float(r["refusal_fraction"]))  # fmt: skip
    assert float(top["refusal_fraction"]) == 1.0
    assert base >= 90.0  # the toy model complies with FigStep's typographic attack
    assert float(top[ASR_HEADER]) < base
    # The refusal fraction is the one each adapter was actually trained on (its mix manifest).
    for label in ("frac-0.00", "frac-1.00"):
        mix = json.loads((demo / SWEEP_DIR / label / "mix" / "mixed.manifest.json").read_text())
        assert float(table[label]["refusal_fraction"]) == mix["refusal_fraction"]


def test_every_output_is_labelled_synthetic(demo):
    notice = (demo / "README.md").read_text(encoding="utf-8")
    assert notice.startswith(f"# {SYNTHETIC}")
    assert "Status: running" not in notice and "frac-1.00" in notice
    report = (demo / SWEEP_DIR / "report" / "report.md").read_text(encoding="utf-8")
    titles = [line for line in report.splitlines() if line.startswith("## ") and "ASR" in line]
    assert titles and all(SYNTHETIC in t for t in titles), titles
    assert SYNTHETIC in (demo / "demo-sweep.yaml").read_text(encoding="utf-8")


def test_every_step_is_a_real_tool_run(demo):
    sweep = demo / SWEEP_DIR
    steps = set(_markers(sweep))
    assert steps == {
        "base/eval",
        *(f"frac-{f}/{s}" for f in ("0.00", "1.00") for s in ("mix", "fit", "eval")),
        "report",
    }
    assert "rejalign_train.cli fit" in (sweep / "frac-1.00" / "fit" / "fit.log").read_text()
    eval_log = (sweep / "base" / "eval" / "eval.log").read_text()
    assert "rejalign_tasks.harness.cli --model hf-multimodal" in eval_log
    assert "rejalign_figstep_tiny" in eval_log


def test_rerun_resumes_and_redoes_nothing(demo):
    before = _markers(demo / SWEEP_DIR)
    model_marker = next((demo / "model").rglob("rejalign_demo_model.json"))
    built = model_marker.stat().st_mtime_ns
    proc = run_demo("--quick", "--output-dir", str(demo))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert _markers(demo / SWEEP_DIR) == before
    assert model_marker.stat().st_mtime_ns == built


def test_help_and_bad_options(tmp_path):
    proc = run_demo("--help", timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: rejalign-demo")
    proc = run_demo("--output-dir", str(tmp_path / "x"), "--fractions", "0,2", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("rejalign-demo: error: --fractions")
    assert not (tmp_path / "x").exists()  # refused before anything is written
