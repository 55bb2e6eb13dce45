"""``rejalign-sweep``: mix, fit and evaluate per refusal fraction, then one report.

The end-to-end tests run one real two-fraction sweep on the tiny model (fractions 0 and 1, so the
two adapters answer visibly differently), SIGKILL it once the first fraction's fit has finished
and its evaluation has started, and rerun it. Every later test reads that sweep: the rerun redid
only the unfinished steps, the report's table agrees with the per-sample logs, the figures are
valid images, a changed option redoes exactly the steps it affects. The option tests need no
model.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from PIL import Image

from rejalign_train.fit import trainer_checkpoints
from rejalign_train.sweep.cache import STEP_FORMAT, STEP_MARKER, StepCache, digest
from rejalign_train.sweep.cli import main as sweep_main
from rejalign_train.sweep.options import (
    DEFAULT_TASKS,
    SweepConfig,
    SweepError,
    check_config,
    fraction_label,
    parse_args,
    parse_fractions,
)
from rejalign_train.sweep.pipeline import Sweep
from rejalign_train.sweep.supervise import sweep_lock
from rejalign_train.synthetic import shape_records, write_json

UTILITY = Path(__file__).parent / "fixtures" / "utility"
STEPS = (
    "frac-0.00/mix",
    "frac-1.00/mix",
    "base/eval",
    "frac-0.00/fit",
    "frac-0.00/eval",
    "frac-1.00/fit",
    "frac-1.00/eval",
    "report",
)
# Finished before the kill: the mixes, the base model's evaluation and the first fit.
FINISHED_BEFORE_KILL = STEPS[:4]
LIMIT = 2


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """Two LLaVA-format sources over synthetic shape images, sharing one image root."""
    root = tmp_path_factory.mktemp("sources")
    write_json(root / "refusal.json", shape_records(root / "images", 8, seed=1, id_prefix="med"))
    write_json(root / "normal.json", shape_records(root / "images", 8, seed=2, id_prefix="mix"))
    return root


def _base_options(model: Path, sources: Path) -> dict:
    return {
        "model": str(model),
        "refusal_source": str(sources / "refusal.json"),
        "normal_source": str(sources / "normal.json"),
        "total": 8,
        "fractions": "0,1",
    }


@pytest.fixture(scope="module")
def config_file(tiny_llava, sources, tmp_path_factory) -> Path:
    """The sweep's YAML configuration: a few CPU training steps, a --limit evaluation."""
    config = {
        **_base_options(tiny_llava, sources),
        "device": "cpu",
        "limit": str(LIMIT),
        "model_args": "dtype=float32",
        "gen_kwargs": "max_gen_toks=24",
        "metadata": json.dumps(
            {
                "scienceqa_data_files": str(UTILITY / "scienceqa_img_test.parquet"),
                "vizwiz_data_files": str(UTILITY / "vizwiz_val.parquet"),
            }
        ),
        # Enough steps for the tiny model to learn the one reply of its data (greedy decoding).
        "fit": {
            "use_cpu": True,
            "num_train_epochs": 16,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 5e-3,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "lora_r": 64,
            "lora_alpha": 128,
            "gradient_checkpointing": False,
            "save_strategy": "no",
            "dataloader_num_workers": 0,
            "report_to": "none",
        },
    }
    path = tmp_path_factory.mktemp("config") / "sweep.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _sweep_cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rejalign_train.sweep", str(config), "--output_dir", str(out)]


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes (other than this one) that mention ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _snapshot(out: Path, steps) -> dict[str, tuple[bytes, int]]:
    return {
        name: (
            (out / name / STEP_MARKER).read_bytes(),
            (out / name / STEP_MARKER).stat().st_mtime_ns,
        )
        for name in steps
    }


@pytest.fixture(scope="module")
def killed_and_rerun(config_file, tmp_path_factory, data_dir) -> dict:
    """Start the sweep, SIGKILL it during the first evaluation after a fit, rerun it."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    first_log = out.parent / "first-run.log"
    with open(first_log, "wb") as log:
        proc = subprocess.Popen(
            _sweep_cmd(config_file, out), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        fit_marker = out / "frac-0.00" / "fit" / STEP_MARKER
        eval_log = out / "frac-0.00" / "eval" / "eval.log"
        deadline = time.monotonic() + 900
        while not (fit_marker.exists() and eval_log.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(
                    "the sweep ended or stalled before the first fit finished:\n"
                    + first_log.read_text(errors="replace")[-4000:]
                )
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The evaluation the sweep had started dies with it (PR_SET_PDEATHSIG), not as an orphan.
    deadline = time.monotonic() + 60
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = _processes_mentioning(str(out))

    before = _snapshot(out, FINISHED_BEFORE_KILL)
    adapter = out / "frac-0.00" / "fit" / "adapter"
    adapter_mtimes = {p.name: p.stat().st_mtime_ns for p in adapter.iterdir()}
    unfinished = out / "frac-0.00" / "eval"
    had_marker = (unfinished / STEP_MARKER).exists()
    (unfinished / "left-by-the-killed-run").write_text("x")

    rerun = subprocess.run(
        _sweep_cmd(config_file, out), capture_output=True, text=True, env=env, timeout=900
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    return {
        "out": out,
        "orphans": orphans,
        "before": before,
        "adapter_mtimes": adapter_mtimes,
        "had_marker": had_marker,
        "rerun": rerun.stdout,
        "config": config_file,
    }


# --------------------------------------------------------------------------- kill and rerun


def test_killed_sweep_leaves_no_orphan_process(killed_and_rerun):
    assert killed_and_rerun["orphans"] == []
    assert not killed_and_rerun["had_marker"]  # the evaluation was killed unfinished


def test_rerun_skips_finished_steps_and_redoes_the_rest(killed_and_rerun):
    out, log = killed_and_rerun["out"], killed_and_rerun["rerun"]
    lines = log.splitlines()
    for name in FINISHED_BEFORE_KILL:
        assert any(f" {name}: finished " in ln and ln.endswith(", skipping") for ln in lines), name
        assert f" {name}: running" not in log
    # Not redone: the markers are the same files, byte for byte, and so is the adapter.
    assert _snapshot(out, FINISHED_BEFORE_KILL) == killed_and_rerun["before"]
    adapter = out / "frac-0.00" / "fit" / "adapter"
    assert {p.name: p.stat().st_mtime_ns for p in adapter.iterdir()} == (
        killed_and_rerun["adapter_mtimes"]
    )
    # The step the kill interrupted was redone from an empty folder, then everything after it.
    assert f"frac-0.00/eval: running (unfinished (no {STEP_MARKER}))" in log
    assert not (out / "frac-0.00" / "eval" / "left-by-the-killed-run").exists()
    for name in ("frac-1.00/fit", "frac-1.00/eval", "report"):
        assert f"{name}: running (not run yet)" in log
    assert "rejalign-sweep: 4 step(s) run, 4 skipped" in log
    for name in STEPS:
        marker = json.loads((out / name / STEP_MARKER).read_text())
        assert marker["step"] == name and marker["outputs"]
    assert (out / "report" / "report.md").is_file()


# --------------------------------------------------------------------------- the report


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_report_agrees_with_the_per_sample_logs(killed_and_rerun):
    out = killed_and_rerun["out"]
    report = out / "report"
    table = {row["model"]: row for row in _read_csv(report / "table_main.csv")}
    assert list(table) == ["base", "frac-0.00", "frac-1.00"]
    cells = [c for c in _read_csv(report / "cells.csv") if c["section"] == "main"]
    headers = {c["column"] for c in cells}
    assert {
        "FigStep ASR (%)",
        "XSTest over-refusal (%)",
        "ScienceQA-IMG accuracy (%)",
        "VizWiz VQA accuracy (%)",
    } <= headers
    for cell in cells:
        label = cell["model"]
        samples_file = Path(cell["samples_file"])
        # Each row reads its own step folder: base model or that fraction's adapter.
        assert samples_file.is_relative_to(out / label / "eval" / "results")
        values = [
            s[cell["metric"]] for s in _samples(samples_file) if s[cell["metric"]] is not None
        ]
        assert len(values) == int(cell["n"]) > 0
        mean = sum(values) / len(values)
        assert float(cell["value"]) == pytest.approx(mean)
        assert float(table[label][cell["column"]]) == pytest.approx(100 * mean)
        assert table[label]["limited"] == "true"  # a --limit run is marked as such
    # The refusal fraction comes from each adapter's own training data.
    assert table["base"]["adapter"] == "" and table["base"]["refusal_fraction"] == ""
    for label in ("frac-0.00", "frac-1.00"):
        mix = json.loads((out / label / "mix" / "mixed.manifest.json").read_text())
        assert float(table[label]["refusal_fraction"]) == mix["refusal_fraction"]
        assert table[label]["adapter"] == str(out / label / "fit" / "adapter")
    assert [float(table[k]["refusal_fraction"]) for k in ("frac-0.00", "frac-1.00")] == [0, 1]


def test_each_row_answers_with_its_own_adapter(killed_and_rerun):
    """Each row's answers come from the data its adapter was trained on.

    Fraction 1 trained only on the refusal sentence, fraction 0 only on shape descriptions: the
    two vocabularies are disjoint, so swapped or shared adapters would show. (A random tiny model
    cannot be relied on for more: its frozen head bounds how well it copies a sentence.)
    """
    out = killed_and_rerun["out"]
    refusal_words = ("sorry", "cannot", "assist", "request")
    shape_words = ("picture", "shows", "ground")
    for label, own, other in (
        ("frac-1.00", refusal_words, shape_words),
        ("frac-0.00", shape_words, refusal_words),
    ):
        results = next((out / label / "eval" / "results").rglob("results_*.json"))
        model_args = json.loads(results.read_text())["config"]["model_args"]
        assert model_args["peft"] == str(out / label / "fit" / "adapter")
        for task in ("rejalign_figstep", "rejalign_xstest"):
            [path] = (out / label / "eval" / "results").rglob(f"samples_{task}_*.jsonl")
            replies = [s["resps"][0][0].lower() for s in _samples(path)]
            assert len(replies) == LIMIT
            for reply in replies:
                assert any(w in reply for w in own), (label, task, reply)
                assert not any(w in reply for w in other), (label, task, reply)


def test_figures_are_valid_images(killed_and_rerun):
    report = killed_and_rerun["out"] / "report"
    for stem in ("asr_vs_refusal_fraction", "safety_tradeoffs"):
        with Image.open(report / f"{stem}.png") as im:
            assert im.format == "PNG" and min(im.size) > 100
            im.verify()
        root = ET.parse(report / f"{stem}.svg").getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert f"![{stem}]({stem}.png)" in (report / "report.md").read_text()


# --------------------------------------------------------------------------- reruns


def _markers(out: Path) -> dict:
    return _snapshot(out, STEPS)


def test_rerun_of_a_finished_sweep_runs_nothing(killed_and_rerun, capsys):
    out = killed_and_rerun["out"]
    before = _markers(out)
    argv = [str(killed_and_rerun["config"]), "--output_dir", str(out)]
    assert sweep_main(argv) == 0
    log = capsys.readouterr().out
    assert "rejalign-sweep: 0 step(s) run, 8 skipped" in log
    assert _markers(out) == before


@pytest.mark.parametrize(
    "extra, redo, after",
    [
        # A training option: every fit; the evaluations and the report follow them.
        (
            ["--fit.learning_rate", "0.004"],
            {"frac-0.00/fit": "inputs changed (fit_args)", "frac-1.00/fit": "inputs changed"},
            {"frac-0.00/eval", "frac-1.00/eval", "report"},
        ),
        # An evaluation option: every evaluation, not the fits.
        (
            ["--limit", "3"],
            {"base/eval": "inputs changed (limit)", "frac-0.00/eval": "", "frac-1.00/eval": ""},
            {"report"},
        ),
        # A mix option: the mixes; all else follows them.
        (
            ["--mix.seed", "1"],
            {"frac-0.00/mix": "inputs changed (mix_args)", "frac-1.00/mix": ""},
            {"frac-0.00/fit", "frac-0.00/eval", "frac-1.00/fit", "frac-1.00/eval", "report"},
        ),
    ],
)
def test_dry_run_shows_what_a_changed_option_redoes(killed_and_rerun, capsys, extra, redo, after):
    out = killed_and_rerun["out"]
    before = _markers(out)
    argv = [str(killed_and_rerun["config"]), "--output_dir", str(out), "--dry_run", *extra]
    assert sweep_main(argv) == 0
    log = capsys.readouterr().out
    for name in STEPS:
        if name in redo:
            assert f" {name}: to run ({redo[name]}" in log, log
        elif name in after:
            assert f" {name}: to run (after the step it depends on)" in log, log
        else:
            assert f" {name}: finished " in log, log
    assert _markers(out) == before  # a dry run changes nothing


def test_a_redone_step_with_the_same_output_keeps_what_follows(killed_and_rerun, capsys):
    """The mix is deterministic: redone, it writes the same data, so the fit stays valid."""
    out = killed_and_rerun["out"]
    (out / "frac-1.00" / "mix" / STEP_MARKER).unlink()
    argv = [str(killed_and_rerun["config"]), "--output_dir", str(out)]
    assert sweep_main(argv) == 0
    log = capsys.readouterr().out
    assert "frac-1.00/mix: running (unfinished" in log
    assert "rejalign-sweep: 1 step(s) run, 7 skipped" in log


def test_changed_outputs_are_redone(killed_and_rerun, capsys):
    out = killed_and_rerun["out"]
    report = out / "report" / "report.md"
    report.write_text(report.read_text() + "edited by hand\n")
    argv = [str(killed_and_rerun["config"]), "--output_dir", str(out)]
    assert sweep_main(argv) == 0
    log = capsys.readouterr().out
    assert "report: running (output report.md changed or missing since the step finished)" in log
    assert "edited by hand" not in report.read_text()
    assert "rejalign-sweep: 1 step(s) run, 7 skipped" in log


def test_resume_fit_continues_a_killed_fit_from_its_checkpoint(config_file, tmp_path):
    """--resume-fit: a fit killed after a checkpoint goes on from it; --stop-after fit."""
    out = tmp_path / "out"
    cmd = _sweep_cmd(config_file, out) + ["--fractions", "1", "--no_base", "--stop_after", "fit"]
    cmd += ["--resume_fit", "--fit.num_train_epochs", "6"]
    cmd += ["--fit.save_strategy", "steps", "--fit.save_steps", "2"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    work = out / "frac-1.00" / "fit" / "adapter.incomplete"
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while not trainer_checkpoints(work)[0]:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail((tmp_path / "first.log").read_text(errors="replace")[-4000:])
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "frac-1.00" / "fit" / STEP_MARKER).exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    log = rerun.stdout
    assert "frac-1.00/mix: finished " in log
    assert f"frac-1.00/fit: running (unfinished (no {STEP_MARKER}); resuming its checkpoint)" in log
    assert "1 step(s) run, 1 skipped; stopped after the fit steps (--stop-after)" in log
    manifest = json.loads(
        (out / "frac-1.00" / "fit" / "adapter" / "rejalign_manifest.json").read_text()
    )
    assert manifest["training"]["resumed_from"].startswith("checkpoint-")
    assert manifest["training"]["global_step"] == 6
    marker = json.loads((out / "frac-1.00" / "fit" / STEP_MARKER).read_text())
    assert marker["resumed"] is True
    assert not (out / "frac-1.00" / "eval").exists() and not (out / "report").exists()


# --------------------------------------------------------------------------- options


def test_fractions():
    assert parse_fractions(["0.1,0", "0.05"]) == [0.0, 0.05, 0.1]
    assert parse_fractions("0,0.2") == [0.0, 0.2]  # a configuration file's string
    assert parse_fractions([0.5, 1]) == [0.5, 1.0]
    for bad, message in (
        (["1.5"], "not a fraction in"),
        (["nan"], "not a fraction in"),
        (["x"], "not a number"),
        (["0.1,0.10"], "given twice"),
        ([","], "no fraction"),
    ):
        with pytest.raises(SweepError, match=message):
            parse_fractions(bad)
    assert [fraction_label(f) for f in (0, 0.05, 0.1, 0.125, 1)] == [
        "frac-0.00",
        "frac-0.05",
        "frac-0.10",
        "frac-0.125",
        "frac-1.00",
    ]


def _required(tmp_path: Path) -> list[str]:
    return [
        "--model",
        "m",
        "--refusal-source",
        "r.json",
        "--output-dir",
        str(tmp_path),
        "--total",
        "4",
    ]


def test_pass_through_options(tmp_path):
    cfg = parse_args(
        _required(tmp_path)
        + ["--fit.num_train_epochs", "1", "--eval.seed=3", "--fit.use_cpu"]
        + ["--mix.seed", "-3", "--fit.lora_target_modules", "q_proj", "v_proj"]
    )
    assert cfg.passthrough == {
        "mix": ["--seed", "-3"],
        "fit": [
            "--num_train_epochs",
            "1",
            "--use_cpu",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
        ],
        "eval": ["--seed", "3"],
    }
    assert cfg.args.refusal_source == "r.json" and cfg.args.total == 4
    with pytest.raises(SweepError, match="unrecognised argument '--bogus'"):
        parse_args(_required(tmp_path) + ["--bogus", "1"])
    with pytest.raises(SweepError, match="unrecognised argument 'stray'"):
        parse_args(_required(tmp_path) + ["stray"])


def test_configuration_file_with_sections(tmp_path):
    path = tmp_path / "sweep.yaml"
    config = {
        "model": "m",
        "refusal-source": "r.json",
        "output_dir": str(tmp_path),
        "total": 10,
        "fractions": [0, 0.5],
        "base": False,
        "mix": {"random_choose": True, "refusal_sentences": ["No.", "Sorry."]},
        "fit": {"use_cpu": True, "gradient_checkpointing": False, "lora_r": 8},
        "eval": {"log_samples": True, "predict_only": False, "seed": "1,2,3,4"},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = parse_args([str(path), "--total", "20", "--fit.lora_r", "16"])
    assert cfg.args.total == 20 and cfg.args.base is False  # flags override the file
    assert parse_fractions(cfg.args.fractions) == [0.0, 0.5]
    assert cfg.passthrough["mix"] == [
        "--random_choose",
        "true",
        "--refusal_sentences",
        "No.",
        "Sorry.",
    ]
    assert cfg.passthrough["fit"] == [
        "--use_cpu",
        "true",
        "--gradient_checkpointing",
        "false",
        "--lora_r",
        "8",
        "--lora_r",
        "16",
    ]
    assert cfg.passthrough["eval"] == ["--log_samples", "--seed", "1,2,3,4"]
    path.write_text(yaml.safe_dump({**config, "epochs": 3}))
    with pytest.raises(SweepError, match="unknown option.*epochs.*fit: or eval: sections"):
        parse_args([str(path)])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fit.output_dir", "x"], "--fit.output_dir: the sweep sets this itself; use the sweep"),
        (["--fit.image-root", "x"], "--fit.image_root: .* use --image-root"),
        (["--eval.limit", "3"], "--eval.limit: .* use --limit"),
        (["--eval.t", "x"], "--eval.t: .* use --tasks"),
        (["--mix.total", "3"], "--mix.total: .* use --total"),
        (["--fit.bogus", "1"], "unknown fit option\\(s\\): --bogus"),
        (["--fit.num_train_epochs", "many"], "fit options: .*invalid float value: 'many'"),
        (["--eval.bogus"], "unknown eval option\\(s\\): --bogus"),
        (["--mix.seed", "x"], "mix options: .*invalid int value: 'x'"),
        (["--mix.refusal_sentences_file", "none.txt"], "mix options: none.txt: cannot read"),
        (["--total", "0"], "--total must be at least 1"),
        (["--fractions", "0,2"], "2 is not a fraction"),
        (["--limit", "all"], "--limit all: not a number"),
        (["--metadata", "{x"], "--metadata: not JSON"),
        (["--fit_config", "none.yaml"], "--fit-config none.yaml: file not found"),
        (["--baseline", "frac-0.30"], "--baseline frac-0.30: not a row of this sweep"),
        (["--no_base", "--baseline", "base"], "--baseline base: not a row"),
    ],
)
def test_bad_options_exit_2_before_any_step(sources, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["--model", "m", "--output_dir", str(out), "--total", "8"]
    argv += ["--refusal_source", str(sources / "refusal.json")]
    argv += ["--normal_source", str(sources / "normal.json"), *extra]
    assert sweep_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rejalign-sweep: error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_source_layout_errors(sources, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "normal.json").write_text((sources / "normal.json").read_text())
    base = ["--model", "m", "--total", "8", "--refusal_source", str(sources / "refusal.json")]
    argv = base + [
        "--output_dir",
        str(tmp_path / "a"),
        "--normal_source",
        str(other / "normal.json"),
    ]
    assert sweep_main(argv) == 2
    assert "different folders: give --image-root" in capsys.readouterr().err
    argv = base + ["--output_dir", str(tmp_path / "a,b")]
    assert sweep_main(argv) == 2
    assert "must not contain a comma" in capsys.readouterr().err
    argv = base + ["--output_dir", str(tmp_path / "c"), "--refusal_source", "missing.json"]
    assert sweep_main(argv) == 2
    assert "--refusal-source missing.json: file not found" in capsys.readouterr().err


def test_a_failing_step_stops_the_sweep_and_leaves_no_marker(sources, tmp_path, capsys):
    """Fraction 0.75 of 12 asks for 9 refusal records; the source holds 8."""
    out = tmp_path / "out"
    argv = ["--model", "m", "--output_dir", str(out), "--total", "12", "--fractions", "0.5,0.75"]
    argv += ["--refusal_source", str(sources / "refusal.json")]
    argv += ["--normal_source", str(sources / "normal.json")]
    assert sweep_main(argv) == 1
    err = capsys.readouterr().err
    assert "frac-0.75/mix: 9 refusal record(s) asked for but" in err and "holds 8" in err
    assert (out / "frac-0.50" / "mix" / STEP_MARKER).is_file()
    assert not (out / "frac-0.75" / "mix" / STEP_MARKER).exists()
    assert not (out / "base").exists()  # nothing runs after a failed step


def _checked(sources: Path, tmp_path: Path, *extra: str) -> SweepConfig:
    cfg = parse_args(
        ["--model", "org/vlm", "--output_dir", str(tmp_path / "out"), "--total", "8"]
        + ["--refusal_source", str(sources / "refusal.json"), "--fractions", "1", *extra]
    )
    check_config(cfg)
    return cfg


def test_tool_commands(sources, tmp_path):
    fit_config = tmp_path / "fit.yaml"
    fit_config.write_text("lora_r: 16\nnum_train_epochs: 1\n")
    cfg = _checked(
        sources,
        tmp_path,
        "--backend",
        "vllm-vlm",
        "--fit_launcher",
        "accelerate launch --num_processes 2",
        "--fit_config",
        str(fit_config),
        "--fit.lora_alpha",
        "32",
        "--mix.refusal_sentences",
        "No.",
        "--model_args",
        "max_model_len=4096",
        "--limit",
        "5",
        "--eval.seed",
        "1",
    )
    run = Sweep(cfg)
    data, adapter = tmp_path / "mixed.jsonl", tmp_path / "adapter"
    assert run.fit_command(data, adapter) == [
        *["accelerate", "launch", "--num_processes", "2", "-m", "rejalign_train.cli", "fit"],
        str(fit_config.resolve()),  # fit takes its configuration file first
        *["--model", "org/vlm", "--data", str(data), "--image_root", str(sources)],
        *["--output_dir", str(adapter), "--lora_alpha", "32"],
        *["--refusal_sentence", "No."],  # the mix's own sentence, for "train without EOS"
    ]
    assert run.eval_command(adapter, tmp_path / "res") == [
        *[sys.executable, "-m", "rejalign_tasks.harness.cli", "--model", "vllm-vlm"],
        "--model_args",
        f"pretrained=org/vlm,lora_local_path={adapter},max_model_len=4096",
        *["--tasks", DEFAULT_TASKS, "--output_path", str(tmp_path / "res")],
        *["--limit", "5", "--seed", "1"],
    ]
    base = Sweep(_checked(sources, tmp_path)).eval_command(None, tmp_path / "res")
    assert base[base.index("--model") + 1] == "hf-multimodal"
    assert base[base.index("--model_args") + 1] == "pretrained=org/vlm"
    plain = Sweep(_checked(sources, tmp_path, "--fit.refusal_sentence", "No.")).fit_command(
        data, adapter
    )
    assert plain[:4] == [sys.executable, "-m", "rejalign_train.cli", "fit"]
    assert plain.count("--refusal_sentence") == 1


def test_fit_configuration_file_errors(sources, tmp_path):
    fit_config = tmp_path / "fit.yaml"
    fit_config.write_text("lora_r: 16\nepochs: 1\n")
    with pytest.raises(SweepError, match="fit.yaml: unknown option\\(s\\) epochs"):
        _checked(sources, tmp_path, "--fit_config", str(fit_config))
    fit_config.write_text("output_dir: x\n")
    with pytest.raises(SweepError, match="fit.yaml: output_dir are set by the sweep"):
        _checked(sources, tmp_path, "--fit_config", str(fit_config))


def test_step_status(tmp_path):
    folder = tmp_path / "step"
    inputs = {"a": 1, "b": "x"}
    step_status = StepCache(folder).status
    assert step_status(inputs) == (None, "not run yet")
    folder.mkdir()
    (folder / "out.txt").write_text("result")
    assert step_status(inputs)[1] == f"unfinished (no {STEP_MARKER})"
    marker = {
        "format": STEP_FORMAT,
        "key": digest(inputs),
        "inputs": inputs,
        "outputs": StepCache(folder).output_digests([folder / "out.txt"]),
    }
    (folder / STEP_MARKER).write_text(json.dumps(marker))
    assert step_status(inputs) == (marker, "finished")
    assert step_status({**inputs, "b": "y"})[1] == "inputs changed (b)"
    assert step_status({**inputs, "c": None})[1] == "inputs changed (c)"
    (folder / "out.txt").write_text("edited")
    assert step_status(inputs)[1] == "output out.txt changed or missing since the step finished"
    (folder / STEP_MARKER).write_text("{")
    assert step_status(inputs)[1] == f"unreadable {STEP_MARKER}"


def test_one_sweep_per_folder(tmp_path):
    with sweep_lock(tmp_path):
        with pytest.raises(SweepError, match="another rejalign-sweep is running"):
            with sweep_lock(tmp_path):
                pass
    with sweep_lock(tmp_path):  # released with the first
        pass
