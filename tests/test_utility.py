"""ScienceQA-IMG and VizWiz-VQA: loaders on Hub-schema fixtures, prompts, scoring, lm_eval CLI."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from rejalign_tasks.benchmarks.data import DataFormatError
from rejalign_tasks.benchmarks.utility import (
    normalize_vqa_answer,
    parse_scienceqa,
    scienceqa_correct,
    scienceqa_doc_to_text,
    scienceqa_img,
    scienceqa_process_results,
    vizwiz_doc_to_text,
    vizwiz_paper_accuracy,
    vizwiz_process_results,
    vizwiz_val,
    vqa_accuracy,
)

FIXTURES = Path(__file__).parent / "fixtures" / "utility"
SCIENCEQA = str(FIXTURES / "scienceqa_img_test.parquet")
VIZWIZ = str(FIXTURES / "vizwiz_val.parquet")
SQA_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
VIZWIZ_SUFFIX = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)


# --------------------------------------------------------------------------- loading


def test_fixtures_load_in_the_hub_schema():
    sqa = scienceqa_img(scienceqa_data_files=SCIENCEQA)["test"]
    assert len(sqa) == 4 and isinstance(sqa.features["image"], datasets.Image)
    assert sqa.column_names[:5] == ["image", "question", "choices", "answer", "hint"]
    assert isinstance(sqa[0]["image"], Image.Image)
    viz = vizwiz_val(vizwiz_data_files=str(FIXTURES / "vizwiz_*.parquet"))["test"]
    assert len(viz) == 4 and viz.column_names == [
        "question_id",
        "image",
        "question",
        "answers",
        "category",
    ]
    assert len(viz[0]["answers"]) == 10


def _write(tmp_path, name: str, rows: list[dict], features: datasets.Features) -> str:
    path = tmp_path / name
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return str(path)


def _sqa_row(**over) -> dict:
    row = {
        "image": Image.new("RGB", (8, 8)),
        "question": "Which?",
        "choices": ["a", "b"],
        "answer": 0,
        "hint": "",
    }
    return {**row, **over}


SQA_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("int8"),
        "hint": datasets.Value("string"),
    }
)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_sqa_row(), _sqa_row(answer=2)], r"row 2, column 'answer': 2 is not an index"),
        ([_sqa_row(choices=["only"])], r"row 1, column 'choices': expected 2 to 5 choices"),
        ([_sqa_row(question="")], r"row 1, column 'question' is empty"),
    ],
)
def test_bad_scienceqa_rows_name_file_row_and_field(tmp_path, rows, message):
    path = _write(tmp_path, "bad.parquet", rows, SQA_FEATURES)
    with pytest.raises(DataFormatError, match=message) as info:
        scienceqa_img(scienceqa_data_files=path)
    assert path in str(info.value)


def test_missing_columns_and_files_are_named(tmp_path):
    with pytest.raises(DataFormatError, match=r"missing column\(s\) 'question_id', 'answers'"):
        vizwiz_val(vizwiz_data_files=SCIENCEQA)
    with pytest.raises(DataFormatError, match=r"vizwiz_data_files='.*nowhere.*': no parquet"):
        vizwiz_val(vizwiz_data_files=str(tmp_path / "nowhere"))
    not_parquet = tmp_path / "val.parquet"
    not_parquet.write_text("question_id,question\n1,what\n")
    with pytest.raises(DataFormatError, match=r"val\.parquet: not readable as parquet"):
        vizwiz_val(vizwiz_data_files=str(not_parquet))


def test_bad_vizwiz_answers_are_named(tmp_path):
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
        }
    )
    row = {"question_id": "q", "image": Image.new("RGB", (8, 8)), "question": "what?"}
    rows = [{**row, "answers": ["x"]}, {**row, "answers": []}]
    path = _write(tmp_path, "v.parquet", rows, features)
    with pytest.raises(DataFormatError, match=r"v\.parquet: row 2, column 'answers'"):
        vizwiz_val(vizwiz_data_files=path)


# --------------------------------------------------------------------------- prompts


def test_scienceqa_prompt_is_llava_cqm_a_with_the_single_prediction_suffix():
    sqa = scienceqa_img(scienceqa_data_files=SCIENCEQA)["test"]
    assert scienceqa_doc_to_text(sqa[0]) == (
        "<image>Which shape is shown?\nA. square\nB. circle" + SQA_SUFFIX
    )
    assert scienceqa_doc_to_text(sqa[1]) == (
        "<image>Context: Look at the picture.\nWhat colour is the square?\nA. red\nB. green\n"
        "C. blue" + SQA_SUFFIX
    )
    assert scienceqa_doc_to_text(sqa[3]).endswith("D. five\nE. six" + SQA_SUFFIX)


def test_vizwiz_prompt_is_llava_s_and_keeps_the_question_as_asked():
    viz = vizwiz_val(vizwiz_data_files=VIZWIZ)["test"]
    assert vizwiz_doc_to_text(viz[1]) == "<image>what is written on this label?" + VIZWIZ_SUFFIX


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ("B", "B"),
        (" C \n", "C"),
        ("A. square", "A"),
        ("A.square", "FAILED"),  # LLaVA needs ". " after the letter
        ("b", "FAILED"),
        ("The answer is D.", "D"),
        ("I think. The answer is B, yes", "B"),
        ("The answer is A. The answer is B.", "FAILED"),  # two matches
        ("The answer is C", "FAILED"),  # the pattern needs a character after the letter
        ("circle", "FAILED"),
        ("F", "FAILED"),
    ],
)
def test_scienceqa_parser_follows_llava(reply, parsed):
    assert parse_scienceqa(reply) == parsed


def test_scienceqa_accuracy_counts_only_a_valid_letter_equal_to_the_answer():
    assert scienceqa_correct("B", 1, 2)
    assert not scienceqa_correct("C", 2, 2)  # a letter beyond the choices is wrong
    assert not scienceqa_correct("FAILED", 0, 2)
    assert scienceqa_process_results({"answer": 0, "choices": ["x", "y"]}, ["A. x"]) == {
        "accuracy": 1.0
    }


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Yes.", "yes"),
        ("The Dog", "dog"),
        ("two", "2"),
        ("None", "0"),
        ("dont", "don't"),
        ("3.5", "3.5"),
        ("red-car", "red car"),
        ("red - car", "red car"),
        ("It's a cat's toy!", "it 's cat 's toy"),
        ("1,000", "1000"),
        ("  blue\n", "blue"),
    ],
)
def test_vqa_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_averages_leave_one_out_subsets():
    answers = ["yes", "yes"] + ["no"] * 8
    # Each "yes" annotator leaves 1 other "yes" (1/3); each "no" one leaves 2 (2/3).
    assert vqa_accuracy("Yes", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("no", answers) == pytest.approx(1.0)
    assert vqa_accuracy("maybe", answers) == 0.0


def test_vizwiz_paper_accuracy_is_the_upstream_script():
    answers = ["Red", "red", "red circle", "pink"] + ["blue"] * 6
    assert vizwiz_paper_accuracy(" RED ", answers) == pytest.approx(2 / 3)
    assert vizwiz_paper_accuracy("red.", answers) == 0.0  # no normalisation upstream
    assert vizwiz_paper_accuracy("blue", answers) == 1.0
    # Upstream joins the answers with "_" and splits again: "t_shirt" counts as "t" and "shirt".
    assert vizwiz_paper_accuracy("shirt", ["t_shirt"] * 10) == 1.0
    assert vizwiz_paper_accuracy("t_shirt", ["t_shirt"] * 10) == 0.0
    doc = {"answers": answers}
    assert vizwiz_process_results(doc, ["red"]) == {
        "vqa_acc": pytest.approx(2 / 3),
        "vqa_acc_normalized": pytest.approx(vqa_accuracy("red", answers)),
    }


# --------------------------------------------------------------------------- lm_eval CLI


def test_utility_tasks_through_lm_eval(tiny_llava, lm_eval_cli, tmp_path):
    metadata = {"scienceqa_data_files": SCIENCEQA, "vizwiz_data_files": VIZWIZ}
    proc, results, samples = lm_eval_cli(
        [
            "--model",
            "hf-multimodal",
            "--model_args",
            f"pretrained={tiny_llava},dtype=float32",
            "--apply_chat_template",
            "--tasks",
            "rejalign_scienceqa_img,rejalign_vizwiz",
            "--metadata",
            json.dumps(metadata),
            "--device",
            "cpu",
            "--batch_size",
            "2",
            "--gen_kwargs",
            "max_gen_toks=6",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sqa = samples["rejalign_scienceqa_img"]
    assert len(sqa) == 4
    for sample in sqa:
        prompt, gen_kwargs, visuals = sample["arguments"]["gen_args_0"].values()
        assert prompt.startswith("USER: <image>\n") and prompt.endswith(SQA_SUFFIX + " ASSISTANT:")
        assert len(visuals["visual"]) == 1 and gen_kwargs["max_gen_toks"] == 6
        doc = sample["doc"]
        expected = scienceqa_correct(sample["resps"][0][0], doc["answer"], len(doc["choices"]))
        assert sample["accuracy"] == float(expected)
        assert sample["target"] == "ABCDE"[sample["doc"]["answer"]]
    task = results["results"]["rejalign_scienceqa_img"]
    assert task["accuracy,none"] == pytest.approx(sum(s["accuracy"] for s in sqa) / 4)

    viz = samples["rejalign_vizwiz"]
    assert len(viz) == 4
    for sample in viz:
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        assert prompt == f"USER: <image>\n{sample['doc']['question']}{VIZWIZ_SUFFIX} ASSISTANT:"
        reply, answers = sample["resps"][0][0], sample["doc"]["answers"]
        assert sample["vqa_acc"] == pytest.approx(vizwiz_paper_accuracy(reply, answers))
        assert sample["vqa_acc_normalized"] == pytest.approx(vqa_accuracy(reply, answers))
    task = results["results"]["rejalign_vizwiz"]
    for metric in ("vqa_acc", "vqa_acc_normalized"):
        assert task[f"{metric},none"] == pytest.approx(sum(s[metric] for s in viz) / 4)
