"""Utility benchmarks the paper tracks beside safety: ScienceQA-IMG and VizWiz-VQA.

Both follow the paper's own evaluation scripts (ybwang119/MLLM_safety_study):

* ScienceQA-IMG test (2017 questions with an image; HF Hub ``lmms-lab/ScienceQA``, config
  ``ScienceQA-IMG``): LLaVA-1.5's ``llava_test_CQM-A`` prompt with its single-prediction suffix,
  scored by LLaVA's ``eval_science_qa.py`` answer parser (letter accuracy).
* VizWiz-VQA val (4319 questions; HF Hub ``lmms-lab/VizWiz-VQA``): LLaVA-1.5's prompt, scored by
  the paper's ``evaluate_vizwiz.py`` (``min(#human answers equal to the reply, ignoring case / 3,
  1)``). The standard VQA accuracy (EvalAI answer normalisation, averaged over the ten
  leave-one-annotator-out subsets, as lmms-eval's ``vizwiz_vqa_val`` computes it) is reported too.

Data come from the Hub ids above by default. ``--metadata`` keys ``scienceqa_data_files`` and
``vizwiz_data_files`` (a parquet file, a folder of parquet files, a glob or a list of them, in
the Hub schema) read local copies instead, e.g. an offline mirror or a test fixture;
``scienceqa_revision`` / ``vizwiz_revision`` pin a Hub revision.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets

from rejalign_tasks.benchmarks.data import DataFormatError

SCIENCEQA_HUB = ("lmms-lab/ScienceQA", "ScienceQA-IMG", "test")
VIZWIZ_HUB = ("lmms-lab/VizWiz-VQA", None, "val")

SCIENCEQA_COLUMNS = ("image", "question", "choices", "answer", "hint")
VIZWIZ_COLUMNS = ("question_id", "image", "question", "answers")

# LLaVA's eval_science_qa.py considers these letters (its --options default).
SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
SCIENCEQA_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
VIZWIZ_SUFFIX = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)


# --------------------------------------------------------------------------- loading


def _local_files(spec: str | Sequence[str], key: str) -> list[str]:
    """Expand a ``*_data_files`` value (file, folder, glob, or a list of them) to parquet files."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[str] = []
    for item in specs:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*.parquet"))
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item, recursive=True))
        else:
            found = [item] if os.path.isfile(item) else []
        if not found:
            raise DataFormatError(f"--metadata {key}={item!r}: no parquet file found there")
        files.extend(found)
    return files


def _load(
    hub: tuple[str, str | None, str], columns: Iterable[str], key: str, metadata: dict
) -> tuple[datasets.Dataset, str]:
    """The dataset and a description of where it came from (for error messages)."""
    local = metadata.get(f"{key}_data_files")
    if local:
        files = _local_files(local, f"{key}_data_files")
        where = ", ".join(files)
        try:
            ds = datasets.Dataset.from_parquet(files)
        except Exception as exc:  # pyarrow and datasets raise several types here
            cause = exc.__cause__ or exc
            raise DataFormatError(
                f"{where}: not readable as parquet files of one schema "
                f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
            ) from exc
    else:
        path, name, split = hub
        where = f"{path}" + (f" (config {name})" if name else "") + f", split {split}"
        ds = datasets.load_dataset(
            path, name, split=split, revision=metadata.get(f"{key}_revision")
        )
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataFormatError(
            f"{where}: missing column(s) {', '.join(map(repr, missing))} "
            f"(has {', '.join(map(repr, ds.column_names))})"
        )
    if len(ds) == 0:
        raise DataFormatError(f"{where}: no rows")
    if not isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image())
    return ds, where


def _check_rows(ds: datasets.Dataset, where: str, check) -> None:
    """Validate every row without decoding its image."""
    text_only = ds.select_columns([c for c in ds.column_names if c != "image"])
    for i, row in enumerate(text_only, start=1):
        problem = check(row)
        if problem:
            raise DataFormatError(f"{where}: row {i}, {problem}")


def _scienceqa_problem(row: dict) -> str | None:
    choices = row["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(SCIENCEQA_OPTIONS):
        return f"column 'choices': expected 2 to {len(SCIENCEQA_OPTIONS)} choices, got {choices!r}"
    answer = row["answer"]
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        return f"column 'answer': {answer!r} is not an index into its {len(choices)} choices"
    if not row["question"]:
        return "column 'question' is empty"
    return None


def _vizwiz_problem(row: dict) -> str | None:
    answers = row["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return f"column 'answers': expected a non-empty list of strings, got {answers!r}"
    if not row["question"]:
        return "column 'question' is empty"
    return None


def scienceqa_img(**metadata) -> dict[str, datasets.Dataset]:
    """``custom_dataset`` for ScienceQA-IMG test."""
    ds, where = _load(SCIENCEQA_HUB, SCIENCEQA_COLUMNS, "scienceqa", metadata)
    _check_rows(ds, where, _scienceqa_problem)
    return {"test": ds}


def vizwiz_val(**metadata) -> dict[str, datasets.Dataset]:
    """``custom_dataset`` for VizWiz-VQA val."""
    ds, where = _load(VIZWIZ_HUB, VIZWIZ_COLUMNS, "vizwiz", metadata)
    _check_rows(ds, where, _vizwiz_problem)
    return {"test": ds}


def doc_to_image(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


# --------------------------------------------------------------------------- ScienceQA


def scienceqa_question(doc: dict) -> str:
    """The ``llava_test_CQM-A`` question text: optional context, question, lettered choices."""
    context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
    choices = "\n".join(f"{SCIENCEQA_OPTIONS[i]}. {c}" for i, c in enumerate(doc["choices"]))
    return f"{context}{doc['question']}\n{choices}"


def scienceqa_doc_to_text(doc: dict) -> str:
    # model_vqa_science.py strips the question, puts the image first, appends the suffix.
    return "<image>" + scienceqa_question(doc).strip() + SCIENCEQA_SUFFIX


def parse_scienceqa(prediction: str) -> str:
    """LLaVA's eval_science_qa.py parser: a bare letter, "X. ...", or one "The answer is X."."""
    text = prediction.strip()
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_correct(prediction: str, answer: int, n_choices: int) -> bool:
    letter = parse_scienceqa(prediction)
    return letter in SCIENCEQA_OPTIONS[:n_choices] and SCIENCEQA_OPTIONS.index(letter) == answer


def scienceqa_doc_to_target(doc: dict) -> str:
    return SCIENCEQA_OPTIONS[doc["answer"]]


def scienceqa_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"accuracy": float(scienceqa_correct(results[0], doc["answer"], len(doc["choices"])))}


# --------------------------------------------------------------------------- VizWiz


def vizwiz_doc_to_text(doc: dict) -> str:
    return "<image>" + doc["question"] + VIZWIZ_SUFFIX


def vizwiz_paper_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The paper's evaluate_vizwiz.py: answers joined with "_" and split again (so an answer
    holding "_" counts as several), each compared with the stripped reply ignoring case."""
    reply = prediction.strip().lower()
    humans = "_".join(answers).split("_")
    return min(sum(h.lower() == reply for h in humans) / 3.0, 1.0)


# EvalAI's VQA answer normalisation (the VQA challenge's evaluation, used by lmms-eval).
_VQA_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split()
)
_VQA_NUMBERS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
_VQA_NUMBERS["none"] = "0"
_VQA_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# Both patterns as EvalAI has them: the first means "a period not followed by a digit" (its
# "(?!<=\d)" is a lookahead for the literal "<=" + digit, not a lookbehind).
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# EvalAI passes re.UNICODE (== 32) as sub()'s positional *count*: at most 32 periods go.
_VQA_PERIOD_MAX = int(re.UNICODE)


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI's VQA answer normalisation, quirks included."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for p in _VQA_PUNCTUATION:
        if p + " " in spaced or " " + p in spaced or _VQA_COMMA_STRIP.search(spaced):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _VQA_PERIOD_STRIP.sub("", text, count=_VQA_PERIOD_MAX)
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Standard VQA accuracy: for each annotator, min(#other annotators agreeing / 3, 1) on
    normalised answers, averaged over the annotators."""
    reply = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in answers]
    scores = [
        min(sum(h == reply for j, h in enumerate(humans) if j != i) / 3.0, 1.0)
        for i in range(len(humans))
    ]
    return sum(scores) / len(scores)


def vizwiz_doc_to_target(doc: dict) -> str:
    return doc["answers"][0]


def vizwiz_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {
        "vqa_acc": vizwiz_paper_accuracy(results[0], doc["answers"]),
        "vqa_acc_normalized": vqa_accuracy(results[0], doc["answers"]),
    }
