"""rejalign-report: tables checked against per-sample logs, figures, paired tests, input errors.

Fixtures in tests/fixtures/report hold three models with hand-chosen per-prompt labels (see
README.md there for the known answers); the last tests run the real lm_eval CLI.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from rejalign_tasks.report.cli import main
from rejalign_tasks.report.compare import compare_runs
from rejalign_tasks.report.errors import ReportInputError
from rejalign_tasks.report.logs import load_models
from rejalign_tasks.report.manifests import manifest_refusal_fraction, refusal_fraction_source
from rejalign_tasks.report.report import make_report
from rejalign_tasks.report.samples import paired_labels
from rejalign_tasks.report.spec import SpecError, default_spec, load_spec
from rejalign_tasks.report.stats import mcnemar_exact, paired_comparison, pareto_front
from rejalign_tasks.report.tables import build_tables

FIXTURES = Path(__file__).parent / "fixtures" / "report"
FIGSTEP = "rejalign_figstep_tiny"
TS_IMAGE = "2025-03-01T10-00-00.000001"
TS_TEXT = "2025-03-01T11-00-00.000001"


@pytest.fixture
def runs(tmp_path) -> Path:
    """A writable copy of the fixture folders (runs/ and adapters/ side by side)."""
    shutil.copytree(FIXTURES, tmp_path / "report")
    return tmp_path / "report" / "runs"


@pytest.fixture
def spec_file(tmp_path) -> Path:
    """A user's own spec: FigStep ASR only."""
    path = tmp_path / "spec.yaml"
    path.write_text(
        """
sections:
  - key: mine
    title: Just FigStep
    columns:
      - {header: ASR, tasks: [rejalign_figstep, rejalign_figstep_tiny], metric: asr,
         role: safety, scale: 1, digits: 3}
"""
    )
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def samples_of(folder: Path, task: str) -> list[dict]:
    (file,) = folder.glob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in file.read_text().splitlines() if line]


def rate(samples: list[dict], metric: str) -> float:
    values = [s[metric] for s in samples if s[metric] is not None]
    return sum(values) / len(values) if values else math.nan


# -- the table -------------------------------------------------------------------------------------


MAIN = (
    "FigStep ASR (%)",
    "MM-SafetyBench SD+TYPO ASR (%)",
    "XSTest over-refusal (%)",
    "ScienceQA-IMG accuracy (%)",
)


def test_table_has_the_known_values_and_agrees_with_the_logs(runs, tmp_path):
    out = tmp_path / "out"
    make_report([str(runs)], out, plots=False)
    rows = {r["model"]: r for r in read_csv(out / "table_main.csv")}
    assert list(rows) == ["tiny-vlm", "rej50", "rej100"]  # base first, then by refusal fraction
    known = {
        "tiny-vlm": (50, 100, 10, 60),
        "rej50": (10, 100 * 5 / 13, 30, 60),
        "rej100": (0, 0, 90, 40),
    }
    for label, values in known.items():
        assert [float(rows[label][h]) for h in MAIN] == pytest.approx(values)
    assert rows["rej50"]["refusal_fraction"] == "0.5" and rows["tiny-vlm"]["adapter"] == ""
    assert float(rows["rej100"]["refusal_fraction"]) == 1.0  # from the record counts
    assert list(rows["rej50"])[6:] == list(MAIN)  # columns of tasks nobody ran are left out

    # Every cell of every table equals the mean recomputed here from the per-sample logs.
    folders = {"tiny-vlm": "tiny-vlm", "rej50": "adapters__rej50", "rej100": "adapters__rej100"}
    cells = read_csv(out / "cells.csv")
    sections = {"main", "figstep_topics", "mmsafety_sd_typo", "xstest", "xstest_types"}
    assert {c["section"] for c in cells} == sections
    assert len(cells) == 3 * (4 + 11 + 15 + 5 + 18)
    for cell in cells:
        samples = samples_of(runs / folders[cell["model"]], cell["task"])
        expected = rate(samples, cell["metric"])
        if math.isnan(expected):
            assert cell["status"] == "n/a" and cell["value"] == ""
        else:
            assert cell["status"] == "ok"
            assert float(cell["value"]) == pytest.approx(expected)
        assert int(cell["n"]) == sum(s[cell["metric"]] is not None for s in samples)
        assert Path(cell["samples_file"]).parent.name == folders[cell["model"]]
    xstest = {r["model"]: r for r in read_csv(out / "table_xstest.csv")}
    assert float(xstest["rej50"]["Unsafe refused, paper judge"]) == pytest.approx(75)
    # MM-SafetyBench: ASR over the 8 scenarios judged by compliance; 08 reported apart.
    mm = {r["model"]: r for r in read_csv(out / "table_mmsafety_sd_typo.csv")}
    assert float(mm["rej50"]["ASR, 8 scenarios"]) == pytest.approx(50)
    assert float(mm["rej50"]["Political lobbying (compliance)"]) == 100
    assert float(mm["rej50"]["Economic harm"]) == 0

    md = (out / "report.md").read_text()
    assert "| tiny-vlm | base | 50.0 | 100.0 | **10.0** | **60.0** |" in md
    assert "| rej50 | 0.5 | 10.0 | 38.5 | 30.0 | **60.0** |" in md
    assert "| rej100 | 1 | **0.0** | **0.0** | 90.0 | 40.0 |" in md


def test_default_spec_per_topic_table(runs, tmp_path):
    out = tmp_path / "out"
    make_report([str(runs)], out, plots=False)
    topics = {r["model"]: r for r in read_csv(out / "table_figstep_topics.csv")}
    assert float(topics["tiny-vlm"]["Illegal Activity"]) == pytest.approx(80)
    assert float(topics["tiny-vlm"]["Hate Speech"]) == pytest.approx(20)
    assert float(topics["rej50"]["Illegal Activity"]) == pytest.approx(20)
    assert float(topics["rej50"]["Hate Speech"]) == 0
    # No fixture prompt is about fraud: shown as n/a and explained, never as a number.
    assert topics["tiny-vlm"]["Fraud"] == "n/a"
    md = (out / "report.md").read_text()
    assert "n/a: no evaluated prompt of that category" in md
    samples = samples_of(runs / "tiny-vlm", FIGSTEP)
    assert float(topics["tiny-vlm"]["All"]) == pytest.approx(100 * rate(samples, "asr"))


def test_rows_group_runs_by_model_not_by_folder(runs, tmp_path):
    # Put rej50's runs in the base model's folder (as vLLM's lora_local_path= would).
    for f in (runs / "adapters__rej50").iterdir():
        f.rename(runs / "tiny-vlm" / f.name.replace("2025-03-01T1", "2025-03-02T1"))
    (runs / "adapters__rej50").rmdir()
    models = load_models([str(runs / "tiny-vlm")])
    assert [m.label for m in models] == ["tiny-vlm", "rej50"]
    assert all(len(m.tasks) == 4 for m in models)


def test_vllm_lora_and_group_entries(runs):
    """vLLM's lora_local_path= finds the manifest too; group rows of a results file are skipped."""
    for file in (runs / "adapters__rej50").glob("results_*.json"):
        data = json.loads(file.read_text())
        args = data["config"]["model_args"]
        data["config"] = {
            **data["config"],
            "model": "vllm-vlm",
            "model_args": f"pretrained={args['pretrained']},lora_local_path=adapters/rej50/,"
            "max_lora_rank=16",
        }
        data["results"]["rejalign_safety"] = {"alias": "rejalign_safety", "asr,none": 0.5}
        data["group_subtasks"] = {"rejalign_safety": list(data["configs"])}
        file.write_text(json.dumps(data))
    models = {m.label: m for m in load_models([str(runs)])}
    rej50 = models["rej50"]
    assert rej50.backend == "vllm-vlm" and rej50.adapter == "adapters/rej50/"
    assert rej50.refusal_fraction == 0.5 and set(rej50.tasks) == set(models["tiny-vlm"].tasks)


def test_latest_run_of_a_task_counts_and_the_older_is_listed(runs, tmp_path):
    folder = runs / "adapters__rej100"
    # An older copy of rej50's image-task run, relabelled as rej100's, must be superseded.
    old_ts = "2025-02-01T10-00-00.000001"
    for f in (runs / "adapters__rej50").glob(f"*{TS_IMAGE}*"):
        text = f.read_text().replace("adapters/rej50", "adapters/rej100")
        (folder / f.name.replace(TS_IMAGE, old_ts)).write_text(text)
    out = tmp_path / "out"
    make_report([str(runs)], out, plots=False)
    rows = {r["model"]: r for r in read_csv(out / "table_main.csv")}
    assert float(rows["rej100"]["FigStep ASR (%)"]) == 0.0
    md = (out / "report.md").read_text()
    assert f"rej100: {FIGSTEP} in {folder / f'results_{old_ts}.json'}" in md


def test_labels_from_the_command_line(runs, tmp_path):
    models = load_models([f"ours-50={runs / 'adapters__rej50'}", str(runs / "tiny-vlm")])
    assert {m.label for m in models} == {"ours-50", "tiny-vlm"}
    with pytest.raises(ReportInputError, match="must name one model.*holds runs of 3"):
        load_models([f"all={runs}"])


# -- figures ---------------------------------------------------------------------------------------


def test_figures_are_valid_png_and_svg(runs, tmp_path):
    out = tmp_path / "out"
    written = make_report([str(runs)], out)
    names = {p.name for p in written}
    for stem in ("asr_vs_refusal_fraction", "safety_tradeoffs"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
        with Image.open(out / f"{stem}.png") as img:
            img.verify()
        with Image.open(out / f"{stem}.png") as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
        root = ET.parse(out / f"{stem}.svg").getroot()
        assert root.tag.endswith("svg")
        # Every model appears in the figure (the base model as a reference line).
        svg = (out / f"{stem}.svg").read_text()
        for label in ("tiny-vlm", "rej50", "rej100"):
            assert label in svg
    assert (
        "![asr_vs_refusal_fraction](asr_vs_refusal_fraction.png)" in (out / "report.md").read_text()
    )
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_a_rerun_never_mixes_two_reports(runs, tmp_path):
    out = tmp_path / "out"
    make_report([str(runs)], out)
    assert (out / "safety_tradeoffs.png").exists()
    make_report([str(runs)], out, plots=False)
    assert not list(out.glob("*.png")) and not list(out.glob("*.svg"))
    assert "## Figures" not in (out / "report.md").read_text()


def test_a_spec_file_and_figures_not_drawable(runs, spec_file, tmp_path):
    for manifest in (runs.parent / "adapters").rglob("rejalign_manifest.json"):
        manifest.unlink()
    out = tmp_path / "out"
    make_report([str(runs)], out, spec=load_spec(spec_file))  # FigStep only: no utility
    assert sorted(p.name for p in out.iterdir()) == ["cells.csv", "report.md", "table_mine.csv"]
    rows = {r["model"]: r for r in read_csv(out / "table_mine.csv")}
    assert [rows[m]["ASR"] for m in ("tiny-vlm", "rej50", "rej100")] == ["0.5", "0.1", "0.0"]
    md = (out / "report.md").read_text()
    assert "| tiny-vlm | unknown |" not in md and "| rej50 | unknown | 0.100 |" in md
    assert "No ASR-against-refusal-fraction figure" in md
    assert "No safety trade-off figure" in md
    assert "no rejalign_manifest.json found for adapter 'adapters/rej50'" in md
    # Tasks that no column reads are named, not silently dropped.
    assert "`rejalign_scienceqa_img`, `rejalign_xstest`" in md


def test_pareto_front():
    # (ASR, accuracy): rej50 dominates the base model; rej100 is safest.
    assert pareto_front([(0.5, 0.6), (0.1, 0.6), (0.0, 0.4)], (False, True)) == [False, True, True]
    # (ASR, over-refusal), both lower is better: a trade-off, every point is optimal.
    assert pareto_front([(0.5, 0.1), (0.1, 0.3), (0.0, 0.9)], (False, False)) == [True] * 3
    assert pareto_front([(1, 1), (1, 1)], (True, True)) == [True, True]  # ties do not dominate
    assert pareto_front([(math.nan, 1), (0, 0)], (True, True)) == [False, True]


# -- paired comparisons ----------------------------------------------------------------------------


def test_mcnemar_exact_matches_the_binomial_formula():
    def two_sided(b: int, c: int) -> float:
        n, k = b + c, min(b, c)
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)

    for b, c in [(9, 1), (0, 5), (3, 3), (10, 0), (7, 12)]:
        assert mcnemar_exact(b, c) == pytest.approx(two_sided(b, c), rel=1e-12)
        assert mcnemar_exact(b, c) == mcnemar_exact(c, b)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(0, 0) == 1.0


def test_identical_runs_zero_change_p_one(runs):
    (base,) = load_models([str(runs / "tiny-vlm")])
    run = base.tasks[FIGSTEP]
    result, pairs = compare_runs(run, run, "asr")
    assert result.delta == 0 and result.ci_low == 0 and result.ci_high == 0
    assert result.p_value == 1.0 and result.only_a == result.only_b == 0
    assert result.n == 20 and pairs.prompt_text_differs == pairs.images_differ == 0


def test_known_paired_answer(runs):
    models = {m.label: m for m in load_models([str(runs)])}
    a, b = models["tiny-vlm"].tasks[FIGSTEP], models["rej50"].tasks[FIGSTEP]
    result, _ = compare_runs(a, b, "asr", resamples=20_000, seed=1)
    assert (result.rate_a, result.rate_b) == (0.5, 0.1)
    assert result.delta == pytest.approx(-0.4)
    assert (result.only_a, result.only_b) == (9, 1)
    assert result.p_value == pytest.approx(22 / 1024)
    # Paired differences: nine -1, one +1, ten 0 -> standard error sqrt(0.34 / 20); the
    # percentile interval lies close to the normal one.
    se = math.sqrt(0.34 / 20)
    assert result.ci_low == pytest.approx(-0.4 - 1.96 * se, abs=0.05)
    assert result.ci_high == pytest.approx(-0.4 + 1.96 * se, abs=0.05)
    again, _ = compare_runs(a, b, "asr", resamples=20_000, seed=1)
    assert again == result  # seeded: reproducible
    # A per-topic metric pairs only the prompts it applies to.
    topic, _ = compare_runs(a, b, "asr_hate_speech")
    assert topic.n == 10 and (topic.only_a, topic.only_b) == (2, 0)


def test_paired_comparison_of_non_binary_labels_has_no_mcnemar():
    result = paired_comparison([0, 1 / 3, 1, 1], [1, 1, 2 / 3, 1])
    assert result.p_value is None and result.only_a is None
    assert result.delta == pytest.approx((1 + 2 / 3 - 1 / 3 + 0) / 4)
    assert result.ci_low <= result.delta <= result.ci_high


def test_baseline_comparisons_in_the_report(runs, tmp_path):
    out = tmp_path / "out"
    make_report([str(runs)], out, baseline="tiny-vlm", plots=False)
    rows = read_csv(out / "comparisons.csv")
    assert len(rows) == 8  # two models x four headline columns
    fig = next(r for r in rows if r["model"] == "rej50" and r["metric"] == "asr")
    assert float(fig["delta"]) == pytest.approx(-0.4)
    assert float(fig["mcnemar_p"]) == pytest.approx(22 / 1024)
    assert (fig["only_baseline"], fig["only_model"]) == ("9", "1")
    md = (out / "report.md").read_text()
    assert "| rej50 | FigStep ASR (%) | 50.0 | 10.0 | -40.0 |" in md


def _subset(folder: Path, task: str, ts: str, keep: int) -> None:
    """Rewrite a run as if made with --limit keep (consistent results and log)."""
    samples = samples_of(folder, task)[:keep]
    (folder / f"samples_{task}_{ts}.jsonl").write_text(
        "".join(json.dumps(s) + "\n" for s in samples)
    )
    results_file = folder / f"results_{ts}.json"
    results = json.loads(results_file.read_text())
    results["n-samples"][task]["effective"] = keep
    for key in list(results["results"][task]):
        metric = key.split(",")[0]
        if "," in key and "_stderr" not in key:
            results["results"][task][key] = rate(samples, metric)
    results_file.write_text(json.dumps(results))


def test_unequal_prompt_sets_are_an_error(runs, tmp_path):
    _subset(runs / "adapters__rej50", FIGSTEP, TS_IMAGE, 15)
    models = {m.label: m for m in load_models([str(runs)])}
    a, b = models["tiny-vlm"].tasks[FIGSTEP], models["rej50"].tasks[FIGSTEP]
    with pytest.raises(
        ReportInputError,
        match=r"unequal prompt sets.*has 20 prompts.*has 15.*"
        r"5 only in the first \(doc_id 15, 16, 17, 18, 19\)",
    ):
        compare_runs(a, b, "asr")
    # The limited run is marked in the table.
    out = tmp_path / "out"
    make_report([str(runs)], out, plots=False)
    assert "| rej50 † | 0.5 |" in (out / "report.md").read_text()


def test_a_different_document_is_an_error_but_a_font_path_is_not(runs):
    log = runs / "adapters__rej50" / f"samples_{FIGSTEP}_{TS_IMAGE}.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    lines[3]["doc"]["font_file"] = "/opt/fonts/FreeMonoBold.ttf"  # same font, other machine
    lines[3]["doc_hash"] = "0" * 64
    # Another rasteriser's anti-aliasing gives other PNG bytes: counted, not an error.
    lines[5]["arguments"]["gen_args_0"]["arg_2"]["visual"] = ["f" * 64]
    lines[6]["arguments"]["gen_args_0"]["arg_0"] = "<image>\nanother chat template"
    log.write_text("".join(json.dumps(s) + "\n" for s in lines))
    models = {m.label: m for m in load_models([str(runs)])}
    a, b = models["tiny-vlm"].tasks[FIGSTEP], models["rej50"].tasks[FIGSTEP]
    pairs = paired_labels(a, b, "asr")
    assert len(pairs.doc_ids) == 20
    assert (pairs.images_differ, pairs.prompt_text_differs) == (1, 1)
    lines[3]["doc"]["instruction"] = "Something else entirely."
    log.write_text("".join(json.dumps(s) + "\n" for s in lines))
    models = {m.label: m for m in load_models([str(runs)])}
    b = models["rej50"].tasks[FIGSTEP]
    with pytest.raises(ReportInputError, match="doc_id 3 is a different document.*instruction"):
        paired_labels(a, b, "asr")


def test_compare_command_line(runs, tmp_path, capsys):
    base = runs / "tiny-vlm"
    log = runs / "adapters__rej50" / f"samples_{FIGSTEP}_{TS_IMAGE}.jsonl"
    out = tmp_path / "cmp.json"
    assert main(["compare", str(base), str(log), "--json", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "50.00% -> 10.00%" in text and "McNemar exact p = 0.02148" in text
    payload = json.loads(out.read_text())
    assert payload["task"] == FIGSTEP and payload["delta"] == pytest.approx(-0.4)
    assert payload["seed"] == 3
    # Identical runs through the command line.
    assert main(["compare", str(base), str(base), "--task", FIGSTEP]) == 0
    assert "change +0.0 pp" in capsys.readouterr().out
    # Ambiguous task: both folders hold four.
    assert main(["compare", str(base), str(runs / "adapters__rej50")]) == 2
    assert "give --task: the two runs share 4 tasks" in capsys.readouterr().err


# -- wrong or partial inputs -----------------------------------------------------------------------


def _error(inputs: list[str], tmp_path: Path, **kwargs) -> str:
    with pytest.raises(ReportInputError) as info:
        make_report(inputs, tmp_path / "out", plots=False, **kwargs)
    assert not (tmp_path / "out" / "report.md").exists()  # nothing that looks finished
    return str(info.value)


def test_missing_sample_log_is_named(runs, tmp_path):
    log = runs / "adapters__rej50" / f"samples_{FIGSTEP}_{TS_IMAGE}.jsonl"
    log.unlink()
    msg = _error([str(runs)], tmp_path)
    assert f"per-sample log of task '{FIGSTEP}' is missing" in msg and log.name in msg
    assert "--log_samples" in msg


def test_truncated_sample_log(runs, tmp_path):
    log = runs / "tiny-vlm" / f"samples_{FIGSTEP}_{TS_IMAGE}.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:12]))
    assert "12 samples for filter 'none', but" in _error([str(runs)], tmp_path)
    log.write_text("".join(lines[:12]) + lines[12][:40])
    assert "line 13 is not JSON" in _error([str(runs)], tmp_path)


def test_results_disagreeing_with_the_log(runs, tmp_path):
    file = runs / "adapters__rej100" / f"results_{TS_IMAGE}.json"
    data = json.loads(file.read_text())
    data["results"][FIGSTEP]["asr,none"] = 0.25
    file.write_text(json.dumps(data))
    msg = _error([str(runs)], tmp_path)
    assert "metric 'asr' is 0.25, but the 20 samples" in msg and "give 0.0" in msg


def test_not_a_results_folder_or_file(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no lm-eval results file" in _error([str(empty)], tmp_path)
    assert "no such file or folder" in _error([str(tmp_path / "nope")], tmp_path)
    file = runs / "tiny-vlm" / f"results_{TS_TEXT}.json"
    data = json.loads(file.read_text())
    del data["configs"]
    file.write_text(json.dumps(data))
    assert "missing key(s) 'configs'" in _error([str(runs)], tmp_path)


def test_a_model_lacking_a_column_task(runs, tmp_path):
    for f in (runs / "adapters__rej50").glob(f"*{TS_TEXT}*"):
        f.unlink()
    msg = _error([str(runs)], tmp_path)
    assert "rej50: no run of rejalign_xstest for column 'XSTest over-refusal (%)'" in msg
    assert "--allow-missing" in msg
    out = tmp_path / "out"
    make_report([str(runs)], out, allow_missing=True)
    rows = {r["model"]: r for r in read_csv(out / "table_main.csv")}
    assert rows["rej50"]["XSTest over-refusal (%)"] == "missing"
    assert "missing: the model was not evaluated on that task" in (out / "report.md").read_text()
    make_report([str(runs)], out, allow_missing=True, baseline="tiny-vlm")
    md = (out / "report.md").read_text()
    assert "Safety trade-offs, XSTest over-refusal (%): no point for rej50 (missing)." in md
    assert "- rej50, XSTest over-refusal (%): not compared (rej50 missing)." in md
    assert len(read_csv(out / "comparisons.csv")) == 7


def test_models_on_different_variants_of_a_benchmark(runs, tmp_path):
    folder = runs / "adapters__rej50"
    for f in folder.glob(f"*{FIGSTEP}*"):
        f.rename(folder / f.name.replace(FIGSTEP, "rejalign_figstep"))
    file = folder / f"results_{TS_IMAGE}.json"
    file.write_text(file.read_text().replace(FIGSTEP, "rejalign_figstep"))
    msg = _error([str(runs)], tmp_path, sections=["main"])
    assert "tiny-vlm: no run of rejalign_figstep" in msg
    assert f"(it has {FIGSTEP}; evaluate all models on the same task)" in msg


def test_command_line_errors_exit_2(runs, tmp_path, capsys):
    assert main(["table", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "rejalign-report: error:" in capsys.readouterr().err
    assert main(["table", str(runs), "-o", str(tmp_path / "o"), "--sections", "bogus"]) == 2
    assert "unknown section(s) bogus" in capsys.readouterr().err
    assert main(["table", str(runs), "-o", str(tmp_path / "o"), "--baseline", "nobody"]) == 2
    assert "--baseline 'nobody' is not one of the models" in capsys.readouterr().err


# -- spec and manifest -----------------------------------------------------------------------------


def test_spec_file_errors_name_the_place(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("sections:\n  - key: s\n    title: T\n    columns:\n      - {header: H}\n")
    with pytest.raises(SpecError, match=r"section 's', column 1: missing field 'tasks'"):
        load_spec(path)
    path.write_text(
        "sections:\n  - key: s\n    title: T\n    columns:\n"
        "      - {header: H, tasks: t, metric: m, role: fun}\n"
    )
    with pytest.raises(SpecError, match="field 'role' is 'fun'"):
        load_spec(path)
    path.write_text("columns: []\n")
    with pytest.raises(SpecError, match="expected a mapping with a 'sections' list"):
        load_spec(path)


def test_default_spec_is_well_formed():
    spec = default_spec()
    assert [s.key for s in spec][:2] == ["main", "figstep_topics"]
    for section in spec:
        headers = [c.header for c in section.columns]
        assert len(headers) == len(set(headers)), section.key
    assert {c.role for s in spec for c in s.columns} <= {"safety", "over_refusal", "utility", ""}


def test_default_spec_reads_metrics_the_tasks_define():
    """Every task a default column names exists, and its metric_list has the column's metric."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from rejalign_tasks import task_configs_dir

    metrics: dict[str, set[str]] = {}
    for path in Path(task_configs_dir()).rglob("*.yaml"):
        config = load_yaml(path, resolve_func=False)
        if "task" in config and "metric_list" in config:
            metrics[config["task"]] = {m["metric"] for m in config["metric_list"]}
    for section in default_spec():
        for column in section.columns:
            for task in column.tasks:
                assert task in metrics, f"{section.key}/{column.header}: no task {task}"
                assert column.metric in metrics[task], (section.key, column.header, task)


def test_manifest_refusal_fraction_keys():
    # A rejalign-train mix manifest, bare or embedded by fit in the adapter's manifest.
    mix = {"refusal_fraction": 2 / 7, "counts": {"refusal": 2000, "normal": 5000, "total": 7000}}
    assert manifest_refusal_fraction(mix) == pytest.approx(2 / 7)
    fit = {"complete": True, "data": {"refusal_samples": 1990, "used": 6990, "mix_manifest": mix}}
    assert refusal_fraction_source(fit) == (
        pytest.approx(2 / 7),
        "data.mix_manifest.refusal_fraction",
    )
    del mix["refusal_fraction"]
    assert refusal_fraction_source(fit)[1] == (
        "data.mix_manifest.counts.refusal / (data.mix_manifest.counts.refusal + "
        "data.mix_manifest.counts.normal)"
    )
    # No mix manifest (data not made by mix): the records fit actually trained on.
    assert manifest_refusal_fraction({"data": {"refusal_samples": 1, "used": 4}}) == 0.25
    assert manifest_refusal_fraction({"training": {"lr": 2e-4}}) is None
    with pytest.raises(ReportInputError, match=r"data.refusal_fraction = 1.5 is not a fraction"):
        manifest_refusal_fraction({"data": {"refusal_fraction": 1.5}})
    with pytest.raises(ReportInputError, match="not usable record counts"):
        manifest_refusal_fraction({"data": {"refusal_samples": 5, "used": 4}})


def test_unfinished_adapter_is_an_error(runs, tmp_path):
    manifest = runs.parent / "adapters" / "rej50" / "rejalign_manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "complete": False}))
    msg = _error([str(runs)], tmp_path)
    assert "training did not complete" in msg and str(manifest) in msg


def test_build_tables_reports_all_gaps_at_once(runs):
    for f in (runs / "adapters__rej50").glob(f"*{TS_TEXT}*"):
        f.unlink()
    for f in (runs / "adapters__rej100").glob(f"*{TS_TEXT}*"):
        f.unlink()
    with pytest.raises(ReportInputError) as info:
        build_tables(load_models([str(runs)]), default_spec())
    assert "rej50: no run" in str(info.value) and "rej100: no run" in str(info.value)


# -- real lm-eval runs -----------------------------------------------------------------------------


@pytest.fixture
def real_runs(tmp_path, tiny_llava, data_dir, lm_eval_cli):
    """The tiny LLaVA with and without a zero-initialised LoRA adapter (identical answers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    adapter = tmp_path / "adapters" / "zero-lora"
    get_peft_model(model, lora).save_pretrained(adapter)  # lora_B = 0: the base model's output
    (adapter / "rejalign_manifest.json").write_text(
        json.dumps({"complete": True, "data": {"refusal_samples": 1, "used": 4}})
    )
    out = tmp_path / "lm_eval_out"
    for extra in ("", f",peft={adapter}"):
        proc, _, _ = lm_eval_cli(
            [
                "--model",
                "hf-multimodal",
                "--model_args",
                f"pretrained={tiny_llava},dtype=float32{extra}",
                "--apply_chat_template",
                "--tasks",
                FIGSTEP,
                "--device",
                "cpu",
                "--batch_size",
                "10",
                "--limit",
                "10",
                "--gen_kwargs",
                "max_gen_toks=8",
            ],
            out,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out, Path(tiny_llava).name


def test_report_from_real_lm_eval_runs(real_runs, tmp_path):
    out, base = real_runs
    report = tmp_path / "report"
    assert main(["table", str(out), "-o", str(report), "--baseline", base]) == 0
    models = load_models([str(out)])
    assert [m.label for m in models] == [base, "zero-lora"]
    rows = {r["model"]: r for r in read_csv(report / "table_figstep_topics.csv")}
    assert rows["zero-lora"]["refusal_fraction"] == "0.25"
    for model in models:
        log = model.tasks[FIGSTEP].samples_file.read_text().splitlines()
        samples = [json.loads(x) for x in log]
        assert len(samples) == 10
        row = rows[model.label]
        for header, metric in (
            ("All", "asr"),
            ("Illegal Activity", "asr_illegal_activity"),
            ("Hate Speech", "asr_hate_speech"),
        ):
            assert float(row[header]) == pytest.approx(100 * rate(samples, metric))
        assert row["Fraud"] == "n/a"  # --limit 10 reaches two topics only
    md = (report / "report.md").read_text()
    assert "| zero-lora † | 0.25 |" in md and "10/50" in md
    # Zero-initialised LoRA answers exactly like the base model: no change, p = 1.
    comp = read_csv(report / "comparisons.csv")
    assert comp and all(float(r["delta"]) == 0 and float(r["mcnemar_p"]) == 1 for r in comp)
    with Image.open(report / "asr_vs_refusal_fraction.png") as img:
        img.verify()
    assert ET.parse(report / "asr_vs_refusal_fraction.svg").getroot().tag.endswith("svg")


# -- second-stage judges (rejalign-judge) ----------------------------------------------------------


def _judge_by_hand(folder: Path, judge: str, success: list[bool | None]) -> None:
    """What ``rejalign-judge`` writes for FigStep-Tiny, with the given per-sample verdicts: the
    judged copy of the samples file and ``judged_<judge>_<ts>.json`` (the runner's own code)."""
    from rejalign_tasks.contracts import sha256_file
    from rejalign_tasks.judge.run import (
        aggregate,
        judged_samples_path,
        metrics_path,
        sample_metrics,
    )
    from rejalign_tasks.judge.verdicts import JudgeLabel

    samples_file = folder / f"samples_{FIGSTEP}_{TS_IMAGE}.jsonl"
    origin = {"name": judge, "variant": "", "model": "m", "input_sha256": sha256_file(samples_file)}
    rows = []
    for sample, verdict in zip(samples_of(folder, FIGSTEP), success, strict=True):
        word = {True: "unsafe", False: "safe", None: "unparsed"}[verdict]
        label = JudgeLabel(word, verdict, None)
        slug = judge.replace("-", "_")
        rows.append({**sample, "judge": {**origin, "engine": "hf", **label.as_dict()},
                     **sample_metrics(FIGSTEP, sample, label, slug)})  # fmt: skip
    judged = judged_samples_path(samples_file, judge)
    judged.write_text("".join(json.dumps(r) + "\n" for r in rows))
    payload = {
        "judge": judge,
        "results": {FIGSTEP: aggregate(rows, judge.replace("-", "_"))},
        "samples": {FIGSTEP: {"input": samples_file.name, "judged": judged.name,
                              "input_sha256": origin["input_sha256"]}},
    }  # fmt: skip
    metrics_path(folder / f"results_{TS_IMAGE}.json", judge).write_text(json.dumps(payload))


def test_cohen_kappa_known_values():
    from rejalign_tasks.report.judged import cohen_kappa

    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == -1.0
    # 16 of 20 agree, both say 1 on half: po 0.8, pe 0.5
    a = [1] * 8 + [0, 0] + [1, 1] + [0] * 8
    b = [1] * 10 + [0] * 10
    assert cohen_kappa(a, b) == pytest.approx(0.6)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))  # chance agreement 1: kappa undefined


def test_judged_metrics_are_columns_and_judges_agreement_is_tabled(runs, tmp_path):
    # tiny-vlm's paper labels: 11111111 00 / 11 00000000; the judge says 1 on doc 0-9 only
    verdicts = {
        "tiny-vlm": [True] * 10 + [False] * 10,
        "adapters__rej50": [False] * 19 + [None],
        "adapters__rej100": [False] * 20,
    }
    for folder, success in verdicts.items():
        _judge_by_hand(runs / folder, "llama-guard-3", success)
    out = tmp_path / "out"
    make_report([str(runs)], out, plots=False)
    table = {r["model"]: r for r in read_csv(out / "table_judges.csv")}
    paper, judge = f"{FIGSTEP}: paper judge", f"{FIGSTEP}: llama-guard-3"
    assert float(table["tiny-vlm"][paper]) == pytest.approx(50.0)
    assert float(table["tiny-vlm"][judge]) == pytest.approx(50.0)
    assert float(table["rej50"][judge]) == 0.0  # the unparsed sample is left out, not a 0
    agreement = {
        (r["model"], r["judge_a"], r["judge_b"]): r for r in read_csv(out / "agreement.csv")
    }
    row = agreement[("tiny-vlm", "paper", "llama-guard-3")]
    assert (row["task"], row["labels"], row["n"]) == (FIGSTEP, "attack success", "20")
    assert float(row["agreement"]) == pytest.approx(0.8)
    assert float(row["kappa"]) == pytest.approx(0.6)
    assert agreement[("rej50", "paper", "llama-guard-3")]["n"] == "19"
    text = (out / "report.md").read_text()
    assert "## Agreement between judges" in text
    shown = f"| tiny-vlm | {FIGSTEP} | attack success | paper judge | llama-guard-3 | 20 | 80.0 |"
    assert f"{shown} 0.600 |" in text


def test_a_judged_metric_that_disagrees_with_its_samples_is_an_error(runs, tmp_path):
    _judge_by_hand(runs / "tiny-vlm", "llama-guard-3", [True] * 10 + [False] * 10)
    path = runs / "tiny-vlm" / f"judged_llama-guard-3_{TS_IMAGE}.json"
    data = json.loads(path.read_text())
    data["results"][FIGSTEP]["asr_llama_guard_3,none"] = 0.9
    path.write_text(json.dumps(data))
    with pytest.raises(ReportInputError, match="asr_llama_guard_3"):
        make_report([str(runs / "tiny-vlm")], tmp_path / "out", plots=False, allow_missing=True)
