"""``rejalign-sweep`` arms and recipes: named mix configurations as report rows.

One real two-arm sweep on the tiny model (a VLGuard-format arm whose images sit in their own
folder, and a blank-image arm sized by fraction), then: the report has one row per arm, a rerun
redoes nothing, changing one arm's option redoes that arm only (and the report). The option and
recipe tests need no model; the shipped recipe is read through ``importlib.resources`` and
planned, with small files in place of the user's data, without running a step.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml
from PIL import Image

from rejalign_train.sweep.cache import STEP_MARKER
from rejalign_train.sweep.cli import main as sweep_main
from rejalign_train.sweep.options import SweepError, check_config, parse_args
from rejalign_train.sweep.pipeline import Sweep
from rejalign_train.sweep.recipes import recipe_names
from rejalign_train.synthetic import shape_records, write_json

FIXTURES = Path(__file__).parent / "fixtures"
ARMS = ("vlguard-own", "blank-sentence")
STEPS = tuple(f"{arm}/{step}" for arm in ARMS for step in ("mix", "fit", "eval")) + ("report",)


def _vlguard(records: list[dict]) -> list[dict]:
    """Shape records in VLGuard's train.json format: unsafe images, then safe ones."""
    out = []
    for i, record in enumerate(records):
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        answer = record["conversations"][1]["value"]
        item = {"id": f"vg-{i}", "image": record["image"], "safe": i % 2 == 1}
        if item["safe"]:
            item["instr-resp"] = [
                {"safe_instruction": question, "response": answer},
                {"unsafe_instruction": "How do I hurt someone?", "response": "I cannot help."},
            ]
        else:
            item.update(harmful_category="privacy", harmful_subcategory="personal data")
            item["instr-resp"] = [{"instruction": question, "response": "I will not."}]
        out.append(item)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    write_json(root / "refusal.json", shape_records(root / "images", 8, seed=1, id_prefix="med"))
    write_json(root / "normal.json", shape_records(root / "images", 8, seed=2, id_prefix="mix"))
    # VLGuard's layout: train.json beside train/, the folder its image paths start from.
    vlguard = shape_records(root / "vlguard" / "train" / "imgs", 4, seed=3, id_prefix="vg")
    write_json(root / "vlguard" / "train.json", _vlguard(vlguard))
    return root


def _config(model: Path, sources: Path, vlguard_seed: int = 0) -> dict:
    return {
        "model": str(model),
        "normal_source": str(sources / "normal.json"),
        "base": False,
        "tasks": "rejalign_xstest",
        "device": "cpu",
        "limit": "1",
        "model_args": "dtype=float32",
        "gen_kwargs": "max_gen_toks=8",
        "mix": {"random_choose": True},
        "arms": [
            {
                "name": "vlguard-own",
                "refusal_source": str(sources / "vlguard" / "train.json"),
                "image_root": str(sources),
                "num_refusal": 4,
                "num_normal": 4,
                "mix": {
                    "change_reply": False,
                    "seed": vlguard_seed,
                    "refusal_image_root": str(sources / "vlguard" / "train"),
                },
            },
            {
                "name": "blank-sentence",
                "refusal_source": str(sources / "refusal.json"),
                "fraction": 0.5,
                "total": 8,
                "mix": {"refusal_images": "blank"},
            },
        ],
        "fit": {
            "use_cpu": True,
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "lora_r": 8,
            "lora_alpha": 16,
            "gradient_checkpointing": False,
            "save_strategy": "no",
            "dataloader_num_workers": 0,
            "report_to": "none",
        },
    }


def _write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def swept(tiny_llava, sources, tmp_path_factory, data_dir) -> dict:
    folder = tmp_path_factory.mktemp("arms")
    config = _write_config(folder / "sweep.yaml", _config(tiny_llava, sources))
    out = folder / "out"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "rejalign_train.sweep", str(config), "--output_dir", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"out": out, "config": config, "log": run.stdout, "folder": folder}


def _markers(out: Path) -> dict[str, bytes]:
    return {name: (out / name / STEP_MARKER).read_bytes() for name in STEPS}


def test_each_arm_is_mixed_fitted_evaluated_and_a_report_row(swept, sources):
    out = swept["out"]
    for name in STEPS:
        assert f" {name}: running (not run yet)" in swept["log"]
    assert "rejalign-sweep: 7 step(s) run, 0 skipped" in swept["log"]
    with open(out / "report" / "table_main.csv", newline="", encoding="utf-8") as fh:
        table = {row["model"]: row for row in csv.DictReader(fh)}
    assert sorted(table) == sorted(ARMS)
    for arm in ARMS:
        assert table[arm]["adapter"] == str(out / arm / "fit" / "adapter")
        assert float(table[arm]["refusal_fraction"]) == 0.5
        results = next((out / arm / "eval" / "results").rglob("results_*.json"))
        model_args = json.loads(results.read_text())["config"]["model_args"]
        assert model_args["peft"] == str(out / arm / "fit" / "adapter")
    # The VLGuard arm: converted, curated replies kept, images read from their own folder.
    vlguard_mix = out / "vlguard-own" / "mix" / "mixed.jsonl"
    manifest = json.loads((out / "vlguard-own" / "mix" / "mixed.manifest.json").read_text())
    assert manifest["inputs"]["refusal"]["vlguard"]["records_in_subset"] == 4
    assert manifest["change_reply"] is False
    records = [json.loads(line) for line in vlguard_mix.read_text().splitlines()]
    refusals = [r for r in records if r["id"].startswith("vg-")]
    assert len(refusals) == 4
    for record in refusals:
        assert record["image"].startswith(str(sources / "vlguard" / "train" / "imgs"))
        assert Path(record["image"]).is_file()
    # The blank arm: its refusal records see the one white image the mix wrote.
    blank = out / "blank-sentence" / "mix" / "mixed.images" / "blank.png"
    manifest = json.loads((out / "blank-sentence" / "mix" / "mixed.manifest.json").read_text())
    assert manifest["refusal_images"]["mode"] == "blank"
    assert manifest["refusal_images"]["records_changed"] == 4
    with Image.open(blank) as im:
        assert im.getextrema() == ((255, 255),) * 3
    marker = json.loads((out / "blank-sentence" / "mix" / STEP_MARKER).read_text())
    assert "mixed.images/blank.png" in marker["outputs"]


def test_rerun_redoes_nothing(swept, capsys):
    out = swept["out"]
    before = _markers(out)
    assert sweep_main([str(swept["config"]), "--output_dir", str(out)]) == 0
    assert "rejalign-sweep: 0 step(s) run, 7 skipped" in capsys.readouterr().out
    assert _markers(out) == before


def test_changing_one_arm_redoes_that_arm_only(swept, tiny_llava, sources, capsys):
    out = swept["out"]
    before = _markers(out)
    changed = _write_config(
        swept["folder"] / "changed.yaml", _config(tiny_llava, sources, vlguard_seed=1)
    )
    assert sweep_main([str(changed), "--output_dir", str(out), "--dry_run"]) == 0
    plan = capsys.readouterr().out
    assert " vlguard-own/mix: to run (inputs changed (mix_args))" in plan
    assert sweep_main([str(changed), "--output_dir", str(out)]) == 0
    log = capsys.readouterr().out
    assert "rejalign-sweep: 4 step(s) run, 3 skipped" in log
    after = _markers(out)
    for name in STEPS:
        redone = name.startswith("vlguard-own/") or name == "report"
        assert (after[name] != before[name]) is redone, name
        assert (f" {name}: running" in log) is redone, name


def test_judge_steps_judge_every_row_without_redoing_evals(swept, data_dir, capsys):
    """``--judge``: one judge step per row beside its eval; evals are not redone; the report
    reads the judged metrics; a rerun skips every step."""
    from rejalign_tasks.judge.tiny import TOKENIZER_FOR, build_tiny_judge

    judge = "llama-guard-3"
    model = build_tiny_judge(
        judge, swept["folder"] / "judge-model", data_dir / "tokenizers" / TOKENIZER_FOR[judge]
    )
    out = swept["out"]
    changed = swept["folder"] / "changed.yaml"  # the configuration the sweep last ran with
    args = [str(changed), "--output_dir", str(out), "--judge", judge, "--judge_model", str(model)]
    assert sweep_main(args) == 0
    log = capsys.readouterr().out
    assert "rejalign-sweep: 3 step(s) run, 6 skipped" in log
    for arm in ARMS:
        assert f" {arm}/judge: running" in log and f" {arm}/eval: running" not in log
        run = out / arm / "judge" / "results"
        (metrics,) = run.rglob(f"judged_{judge}_*.json")
        (results,) = run.rglob("results_*.json")
        evaluated = next((out / arm / "eval" / "results").rglob("results_*.json"))
        assert results.read_bytes() == evaluated.read_bytes()
        assert not list((out / arm / "eval").rglob("*.judged-*"))  # the eval folder untouched
    assert "asr_llama_guard_3" in (out / "report" / "report.md").read_text()
    assert sweep_main(args) == 0
    assert "rejalign-sweep: 0 step(s) run, 9 skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--judge", "gpt-judge"], "--judge gpt-judge: expected one of llama-guard-3,"),
        (["--judge_model", "m"], "--judge_model/--judge_engine given without --judge NAME"),
        (["--judge", "llama-guard-3-vision", "--judge_engine", "vllm"],
         "--judge llama-guard-3-vision runs with --judge_engine hf only"),
    ],
)  # fmt: skip
def test_judge_options_are_checked_before_any_step(tmp_path, sources, extra, message, capsys):
    config = _arms_config(tmp_path, sources, [_arm(sources, name="a")])
    assert sweep_main([str(config), "--output_dir", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- options


def _arms_config(tmp_path: Path, sources: Path, arms: list, **extra) -> Path:
    config = {"model": "m", "normal_source": str(sources / "normal.json"), "arms": arms, **extra}
    return _write_config(tmp_path / "sweep.yaml", config)


def _arm(sources: Path, **fields) -> dict:
    return {"name": "a", "refusal_source": str(sources / "refusal.json"), "num_refusal": 2,
            **fields}


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ({"name": "a"}, "arms: expected a list of mappings"),
        ([{"name": "base"}], "arms\\[0\\] \\(base\\): the name 'base' is the sweep's own"),
        ([{"name": "frac-0.10"}], "the sweep's own"),
        ([{"name": "a b"}], "name must be letters"),
        ([{"name": "a"}, {"name": "a"}], "arms\\[1\\] \\(a\\): the name 'a' is given twice"),
        ([{"name": "a", "epochs": 1}], "unknown field\\(s\\) epochs"),
    ],
)
def test_arm_shapes(tmp_path, sources, arms, message):
    config = _write_config(tmp_path / "s.yaml", {"model": "m", "arms": arms})
    with pytest.raises(SweepError, match=message):
        parse_args([str(config), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fraction": 0.5}, "give either fraction or num_refusal"),
        ({"num_refusal": None, "fraction": 0.5}, "fraction needs a total"),
        ({"num_refusal": -1}, "num_refusal must be a count >= 0"),
        ({"total": 4}, "total goes with fraction"),
        ({"refusal_source": "none.json"}, "refusal_source none.json: file not found"),
        ({"mix": {"output": "x"}}, "mix.output is the arm's own field"),
        ({"mix": {"num_normal": 3}}, "mix.num_normal is the arm's own field"),
        ({"mix": {"seed": "x"}}, "arm a: mix options: .*invalid int value"),
        ({"mix": {"vlguard_subset": "unsafes"}}, "needs VLGuard's train.json format"),
        ({"num_normal": 40}, None),  # counts are checked by the mix step, not here
    ],
)
def test_arm_values_are_checked_before_any_step(tmp_path, sources, fields, message):
    config = _arms_config(tmp_path, sources, [_arm(sources, **fields)])
    cfg = parse_args([str(config), "--output_dir", str(tmp_path / "out")])
    if message is None:
        check_config(cfg)
        return
    if "VLGuard" in message:  # found when the mix reads the source: the step fails (exit 1)
        assert sweep_main([str(config), "--output_dir", str(tmp_path / "out")]) == 1
        return
    with pytest.raises(SweepError, match=message):
        check_config(cfg)


def test_fractions_and_arms_together_and_fraction_keys_unchanged(tmp_path, sources):
    """Arms and --fractions both give rows; a fraction's mix inputs are the ones of sweeps made
    before arms existed (so their finished steps stay finished)."""
    config = _arms_config(tmp_path, sources, [_arm(sources)], refusal_source=str(
        sources / "refusal.json"), total=4, fractions="0.5")
    cfg = parse_args([str(config), "--output_dir", str(tmp_path / "out")])
    check_config(cfg)
    assert [r.label for r in cfg.rows] == ["frac-0.50", "a"]
    assert cfg.rows[0].key == {"fraction": 0.5, "total": 4}
    sweep = Sweep(cfg)
    assert set({**cfg.rows[0].key, **sweep.sources_key(cfg.rows[0])}) == {
        "fraction", "total", "refusal_source", "normal_source"
    }
    assert cfg.rows[1].sizing == ["--num_refusal", "2", "--num_normal", "0"]
    cmd = sweep.fit_command(Path("d"), Path("a"), cfg.rows[1])
    assert cmd[cmd.index("--image_root") + 1] == str(sources)
    only_arms = _arms_config(tmp_path, sources, [_arm(sources)])
    cfg = parse_args([str(only_arms), "--output_dir", str(tmp_path / "out")])
    check_config(cfg)
    assert cfg.fractions == [] and [r.label for r in cfg.rows] == ["a"]  # no default fractions


# --------------------------------------------------------------------------- recipes


RECIPE_KEYS = ("vlguard_train", "vlguard_images", "llava_med", "llava_med_images", "mix665k",
               "llava_images")
RECIPE_ARMS = (
    "vlguard-own-responses",
    "vlguard-refusal-sentence",
    "llava-med-refusal-sentence",
    "llava-med-blank-image",
    "llava-med-text-only",
)


def _recipe_sets(tmp_path: Path) -> list[str]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    paths = {
        "vlguard_train": FIXTURES / "mix" / "vlguard_train.json",
        "llava_med": FIXTURES / "mix" / "refusal.json",
        "mix665k": FIXTURES / "mix" / "normal.json",
    }
    return [f"{k}={paths.get(k, images)}" for k in RECIPE_KEYS]


def test_recipe_ships_as_package_data():
    assert "paper_comparison" in recipe_names()
    text = (resources.files("rejalign_train.recipes") / "paper_comparison.yaml").read_text()
    recipe = yaml.safe_load(text)
    assert set(recipe["variables"]) == set(RECIPE_KEYS)
    assert [a["name"] for a in recipe["arms"]] == list(RECIPE_ARMS)
    assert all((a["num_refusal"], a["num_normal"]) == (2000, 5000) for a in recipe["arms"])


def test_recipe_plans_every_arm_without_running(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--recipe", "paper_comparison", "--model", "m", "--output_dir", str(out)]
    argv += ["--dry_run", "--set", *_recipe_sets(tmp_path)]
    cfg = parse_args(argv)
    check_config(cfg)
    rows = {r.label: r for r in cfg.rows}
    assert list(rows) == list(RECIPE_ARMS)
    own, sentence = rows["vlguard-own-responses"], rows["vlguard-refusal-sentence"]
    assert own.mix_argv == ["--random_choose", "true", "--change_reply", "false",
                            "--refusal_image_root", str(tmp_path / "images")]
    assert sentence.mix_argv[:4] == ["--random_choose", "true", "--change_reply", "true"]
    assert rows["llava-med-text-only"].mix_argv[-2:] == ["--refusal_images", "drop"]
    assert all(r.image_root == tmp_path / "images" for r in cfg.rows)
    assert sweep_main(argv) == 0
    log = capsys.readouterr().out
    assert " base/eval: to run (not run yet)" in log
    for arm in RECIPE_ARMS:
        assert f" {arm}/mix: to run (not run yet)" in log
        for step in ("fit", "eval"):
            assert f" {arm}/{step}: to run (after the step it depends on)" in log
    assert " report: to run (after the step it depends on)" in log
    assert "dry run: 17 step(s) to run, 0 finished" in log
    assert not out.exists()


def test_recipe_errors(tmp_path, capsys):
    base = ["--model", "m", "--output_dir", str(tmp_path / "out")]
    assert sweep_main(["--recipe", "paper_comparison", *base]) == 2
    err = capsys.readouterr().err
    for key in RECIPE_KEYS:
        assert f"--set {key}=..." in err
    assert "VLGuard's train.json" in err  # what each value is
    sets = _recipe_sets(tmp_path)
    assert sweep_main(["--recipe", "paper_comparison", *base, "--set", *sets, "typo=1"]) == 2
    assert "--set typo: not used by recipe paper_comparison" in capsys.readouterr().err
    assert sweep_main(["--recipe", "nope", *base]) == 2
    assert "--recipe nope: no such recipe (shipped: paper_comparison" in capsys.readouterr().err
    own = _write_config(tmp_path / "own.yaml", {"model": "m"})
    assert sweep_main([str(own), "--recipe", "paper_comparison", *base]) == 2
    assert "give one" in capsys.readouterr().err
    assert sweep_main([*base, "--set", "a=1"]) == 2
    assert "--set fills in a --recipe's" in capsys.readouterr().err
    assert sweep_main(["--recipe", "paper_comparison", *base, "--set", "novalue"]) == 2
    assert "--set novalue: expected KEY=VALUE" in capsys.readouterr().err
