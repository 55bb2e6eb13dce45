"""``rejalign-train mix``: the upstream draw reproduced exactly, sizing, sentences, errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import pytest

from rejalign_train.mixing import REFUSAL_SENTENCE, MixArguments, main, manifest_path, mix
from rejalign_train.record_writer import to_llava
from rejalign_train.records import iter_records

FIXTURES = Path(__file__).parent / "fixtures"
REFUSAL = FIXTURES / "mix" / "refusal.json"
NORMAL = FIXTURES / "mix" / "normal.json"


def _load_yardstick():
    """tests/fixtures/upstream_mix.py: upstream's algorithm restated, sharing no code with mix."""
    spec = importlib.util.spec_from_file_location("upstream_mix", FIXTURES / "upstream_mix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


upstream = _load_yardstick()


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


def _write(path: Path, records, *, jsonl: bool = False) -> Path:
    if jsonl:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1)
    path.write_text(text, encoding="utf-8")
    return path


def _llava(rid, *pairs, image: str | None = "img.jpg") -> dict:
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    record = {"id": rid}
    if image:
        record["image"] = image
    record["conversations"] = turns
    return record


# --------------------------------------------------------------------------------------------
# The primitives the equivalence rests on


@pytest.mark.parametrize(
    ("n", "k"),
    [(0, 0), (1, 1), (9, 3), (10, 10), (30, 5), (100, 50), (300, 7), (2000, 600), (5000, 40)],
)
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_sampling_positions_equals_sampling_the_list(n, k, seed):
    """random.sample touches its population only via len() and indexing: drawing from range(n)
    gives the positions drawing from the records gives, in both of its algorithms (a copied
    pool when k is large relative to n, a set of seen positions otherwise), and leaves the
    generator in the same state."""
    records = [{"id": f"r{i}"} for i in range(n)]
    by_list, by_range = random.Random(seed), random.Random(seed)
    drawn = by_list.sample(records, k)
    positions = by_range.sample(range(n), k)
    assert [records[p] for p in positions] == drawn
    assert by_list.getstate() == by_range.getstate()


def test_the_module_generator_seeded_is_a_seeded_instance():
    """Upstream seeds the module-level generator; mix uses random.Random(seed): same stream."""
    random.seed(0)
    ours = random.Random(0)
    assert [random.random() for _ in range(5)] == [ours.random() for _ in range(5)]
    assert random.choice(range(1, 4)) == ours.choice(range(1, 4))


# --------------------------------------------------------------------------------------------
# Official-compatible mode against the yardstick


OPTION_SETS = [
    # (num_refusal, num_normal, random_choose, change_reply, similar)
    (3, 5, True, True, False),
    (9, 10, True, True, False),  # every refusal record, so the shared ids exclude two normals
    (4, 0, True, True, False),
    (0, 6, False, True, False),
    (5, 4, False, True, False),  # no turn choice: the first reply is replaced, the rest kept
    (5, 4, True, False, False),  # turn choice, replies kept
    (20, 10, True, True, False),  # more than the file holds: upstream clips the count
    (0, 50, True, True, False),  # the same for the normal count
    (9, 2, True, True, True),  # --similar: normals drawn among the shared ids
]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize(("k1", "k2", "choose", "change", "similar"), OPTION_SETS)
def test_official_mode_is_byte_identical_to_upstream(
    tmp_path, seed, k1, k2, choose, change, similar
):
    expected = upstream.upstream_mix(
        str(REFUSAL),
        str(NORMAL),
        k1,
        k2,
        seed=seed,
        random_choose=choose,
        change_reply=change,
        similar=similar,
    )
    reference = tmp_path / "upstream.json"
    upstream.save(expected, str(reference))
    out = tmp_path / "mixed.json"
    argv = [
        "--official",
        "--refusal_source",
        REFUSAL,
        "--normal_source",
        NORMAL,
        "--num_refusal",
        k1,
        "--num_normal",
        k2,
        "--seed",
        seed,
        "--output",
        out,
    ]
    argv += ["--random_choose"] if choose else []
    argv += [] if change else ["--no_change_reply"]
    argv += ["--similar"] if similar else []
    assert _run(*argv) == 0
    assert out.read_bytes() == reference.read_bytes()
    refusals = sum(1 for r in expected if r["conversations"][1]["value"] == REFUSAL_SENTENCE)
    manifest = json.loads(manifest_path(out).read_text(encoding="utf-8"))
    assert manifest["counts"]["total"] == len(expected)
    assert refusals == (manifest["counts"]["refusal"] if change else 0)


def test_yardstick_fixture_exercises_the_rules(monkeypatch):
    """The fixture triggers the behaviours the comparison must cover (so it cannot pass
    vacuously): redraws on 'what about', '\\n<image>' moved to the front, exclusion by id."""
    calls = []
    choice = random.choice
    monkeypatch.setattr(random, "choice", lambda seq: calls.append(seq) or choice(seq))
    out = upstream.upstream_mix(
        str(REFUSAL), str(NORMAL), 9, 10, random_choose=True, change_reply=True
    )
    assert len(calls) > 9  # at least one redraw after a 'what about' turn
    records = json.loads(REFUSAL.read_text(encoding="utf-8"))
    assert any(r["conversations"][0]["value"].endswith("\n<image>") for r in records)
    normal_ids = {r["id"] for r in json.loads(NORMAL.read_text(encoding="utf-8"))}
    assert {r["id"] for r in records} & normal_ids == {"shared-1", "shared-2"}
    assert len(out) == 9 + 10  # the two shared ids were excluded from the normal draw


def _synthetic(rng: random.Random, n: int, prefix: str, shared: range) -> list[dict]:
    records = []
    for i in range(n):
        rid = f"s{i}" if i in shared else f"{prefix}{i}"
        pairs = []
        for t in range(rng.randint(1, 4)):
            question = ("What about " if t and rng.random() < 0.3 else "") + f"q{i}.{t}?"
            if t == 0:
                question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
            pairs.append((question, f"a{i}.{t}"))
        records.append(_llava(rid, *pairs, image=f"{prefix}/{i}.jpg"))
    return records


@pytest.mark.parametrize(("n1", "n2", "k1", "k2"), [(40, 300, 12, 200), (200, 400, 150, 30)])
def test_official_mode_matches_upstream_on_larger_random_files(tmp_path, n1, n2, k1, k2):
    """Both random.sample algorithms (pool and set) on both draws, JSON and JSONL inputs."""
    rng = random.Random(n1 * n2)
    first = _write(tmp_path / "first.jsonl", _synthetic(rng, n1, "m", range(0, n1, 3)), jsonl=True)
    second = _write(tmp_path / "second.json", _synthetic(rng, n2, "c", range(0, n2, 2)))
    first_json = _write(tmp_path / "first.json", list(iter_raw(first)))
    expected = upstream.upstream_mix(
        str(first_json), str(second), k1, k2, seed=3, random_choose=True, change_reply=True
    )
    out = tmp_path / "mixed.jsonl"
    assert (
        _run(
            "--official",
            "--refusal-source",
            first,
            "--normal-source",
            second,
            "--seed",
            3,
            "--num-refusal",
            k1,
            "--num-normal",
            k2,
            "--random-choose",
            "--output",
            out,
        )
        == 0
    )
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert got == expected


def iter_raw(path: Path):
    return (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)


def test_official_mode_exclusion_leaving_too_few_fails_like_upstream(tmp_path):
    first = _write(
        tmp_path / "a.json", [_llava("x", ("<image>\nq", "a")), _llava("y", ("<image>\nq", "a"))]
    )
    second = _write(
        tmp_path / "b.json", [_llava("x", ("<image>\nq", "a")), _llava("z", ("<image>\nq", "a"))]
    )
    with pytest.raises(ValueError, match="Sample larger than population"):
        upstream.upstream_mix(str(first), str(second), 2, 2)
    out = tmp_path / "o.json"
    assert (
        _run(
            "--official",
            "--refusal_source",
            first,
            "--normal_source",
            second,
            "--num_refusal",
            2,
            "--num_normal",
            2,
            "--output",
            out,
        )
        == 2
    )
    assert not out.exists()


def test_official_mode_needs_ids(tmp_path, capsys):
    second = _write(tmp_path / "b.json", [_llava("z", ("<image>\nq", "a")), {"conversations": []}])
    assert (
        _run(
            "--official",
            "--refusal_source",
            REFUSAL,
            "--normal_source",
            second,
            "--num_refusal",
            1,
            "--num_normal",
            1,
            "--output",
            tmp_path / "o.json",
        )
        == 2
    )
    assert f"{second}: record 1, field 'id': no id" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Default mode


def _default(tmp_path: Path, *extra: object, name: str = "mixed.jsonl") -> tuple[list, dict]:
    out = tmp_path / name
    assert (
        _run("--refusal-source", REFUSAL, "--normal-source", NORMAL, "--output", out, *extra) == 0
    )
    manifest = json.loads(manifest_path(out).read_text(encoding="utf-8"))
    return list(iter_records(out)), manifest


def test_default_mode_draws_what_official_mode_draws(tmp_path):
    """Same records, order and edits as upstream, as normalised LLaVA records; the one
    difference: a refusal record without an image gets no dangling <image> placeholder."""
    for seed in range(6):
        records, manifest = _default(
            tmp_path, "--num-refusal", 9, "--num-normal", 10, "--random-choose", "--seed", seed
        )
        expected = upstream.upstream_mix(
            str(REFUSAL), str(NORMAL), 9, 10, seed=seed, random_choose=True, change_reply=True
        )
        for rec in expected:
            first = rec["conversations"][0]
            if "image" not in rec and first["value"].startswith("<image>\n"):
                first["value"] = first["value"][len("<image>\n") :]  # upstream's dangling tag
            rec["id"] = str(rec["id"])  # normalised ids are strings
            rec.pop("model", None)  # normalised records keep id, images and turns only
        assert [to_llava(r) for r in records] == expected
        assert manifest["mode"] == "default"
        assert manifest["counts"] == {"refusal": 9, "normal": 10, "total": 19}
        assert manifest["normal_records_excluded_by_id"] == 2


def test_sentence_pool_changes_sentences_only(tmp_path):
    pool = ["I can't help with that.", "Sorry, I won't do this.", REFUSAL_SENTENCE]
    single, _ = _default(tmp_path, "--num_refusal", 9, "--num_normal", 6, "--random_choose")
    pooled, manifest = _default(
        tmp_path,
        "--num_refusal",
        9,
        "--num_normal",
        6,
        "--random_choose",
        "--refusal_sentences",
        *pool,
    )
    assert [r["id"] for r in pooled] == [r["id"] for r in single]
    refusal_ids = {str(r["id"]) for r in json.loads(REFUSAL.read_text(encoding="utf-8"))}
    sentences = [r["messages"][-1]["content"] for r in pooled if r["id"] in refusal_ids]
    assert len(sentences) == 9 and set(sentences) <= set(pool) and len(set(sentences)) > 1
    assert sum(manifest["sentence_counts"].values()) == 9
    assert manifest["refusal_sentences"] == pool
    again, _ = _default(
        tmp_path,
        "--num_refusal",
        9,
        "--num_normal",
        6,
        "--random_choose",
        "--refusal_sentences",
        *pool,
        name="again.jsonl",
    )
    assert again == pooled  # seeded
    sentences_file = tmp_path / "pool.txt"
    sentences_file.write_text("\n".join(pool) + "\n\n", encoding="utf-8")
    from_file, manifest = _default(
        tmp_path,
        "--num_refusal",
        9,
        "--num_normal",
        6,
        "--random_choose",
        "--refusal_sentences_file",
        sentences_file,
        name="file.jsonl",
    )
    assert from_file == pooled and manifest["refusal_sentences"] == pool


def test_default_mode_keeps_system_turn_and_puts_one_placeholder_per_image(tmp_path):
    source = _write(
        tmp_path / "m.json",
        [
            {
                "id": "two-images",
                "images": ["a.jpg", "b.jpg"],
                "messages": [
                    {"role": "system", "content": "Be careful."},
                    {"role": "user", "content": "<image>\n<image>\nCompare them."},
                    {"role": "assistant", "content": "The left is larger."},
                    {"role": "user", "content": "Which is brighter?"},
                    {"role": "assistant", "content": "The right one."},
                ],
            }
        ],
    )
    for seed in range(4):
        out = tmp_path / f"o{seed}.jsonl"
        assert (
            _run(
                "--refusal_source",
                source,
                "--num_refusal",
                1,
                "--random_choose",
                "--seed",
                seed,
                "--record_format",
                "messages",
                "--output",
                out,
            )
            == 0
        )
        (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert row["images"] == ["a.jpg", "b.jpg"]
        system, user, reply = row["messages"]
        assert system == {"role": "system", "content": "Be careful."}
        assert user["content"].startswith("<image>\n<image>\n")
        assert user["content"].count("<image>") == 2
        assert reply == {"role": "assistant", "content": REFUSAL_SENTENCE}


def test_fraction_sizing(tmp_path):
    _, manifest = _default(tmp_path, "--refusal-fraction", 0.25, "--total", 8)
    assert manifest["counts"] == {"refusal": 2, "normal": 6, "total": 8}
    assert manifest["refusal_fraction"] == 0.25
    _, manifest = _default(tmp_path, "--refusal-fraction", 0, "--total", 5)
    assert manifest["counts"]["refusal"] == 0 and manifest["refusal_fraction"] == 0
    _, manifest = _default(tmp_path, "--refusal-fraction", 1, "--total", 9, "--random-choose")
    assert manifest["counts"] == {"refusal": 9, "normal": 0, "total": 9}


def test_manifest_and_outputs(tmp_path):
    records, manifest = _default(
        tmp_path, "--num-refusal", 2, "--num-normal", 3, "--random-choose", "--seed", 5
    )
    out = tmp_path / "mixed.jsonl"
    assert manifest_path(out) == tmp_path / "mixed.manifest.json"
    sha = hashlib.sha256
    assert manifest["output"]["sha256"] == sha(out.read_bytes()).hexdigest()
    assert manifest["output"]["records"] == len(records) == 5
    assert manifest["inputs"]["refusal"]["sha256"] == sha(REFUSAL.read_bytes()).hexdigest()
    assert manifest["inputs"]["normal"]["sha256"] == sha(NORMAL.read_bytes()).hexdigest()
    assert manifest["inputs"]["normal"]["records"] == 12
    assert manifest["seed"] == 5 and manifest["random_choose"] is True
    assert manifest["refusal_sentences"] == [REFUSAL_SENTENCE]
    assert manifest["version"]
    assert sum(r["messages"][-1]["content"] == REFUSAL_SENTENCE for r in records) == 2


def test_failed_run_leaves_previous_output_and_manifest(tmp_path):
    _default(tmp_path, "--num-refusal", 2, "--num-normal", 3)
    out = tmp_path / "mixed.jsonl"
    before = (out.read_bytes(), manifest_path(out).read_bytes())
    assert (
        _run(
            "--refusal-source",
            REFUSAL,
            "--normal-source",
            NORMAL,
            "--output",
            out,
            "--num-refusal",
            2,
            "--num-normal",
            500,
        )
        == 2
    )
    assert (out.read_bytes(), manifest_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.jsonl", "mixed.manifest.json"]


# --------------------------------------------------------------------------------------------
# Bad input: each gives its own clear error, naming the file and the record


def _error(capsys, *argv: object) -> str:
    assert _run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rejalign-train mix: error: ")
    return err


def test_drawn_record_without_assistant_turn(tmp_path, capsys):
    bad = _write(
        tmp_path / "bad.json",
        [
            {
                "id": "q1",
                "image": "a.jpg",
                "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}],
            }
        ],
    )
    err = _error(
        capsys, "--refusal_source", bad, "--num_refusal", 1, "--output", tmp_path / "o.jsonl"
    )
    assert f"{bad}: record 0 (id 'q1'), field 'conversations': no assistant turn" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_placeholder_count_not_matching_images(tmp_path, capsys):
    bad = _write(
        tmp_path / "bad.jsonl",
        [
            _llava("ok", ("<image>\nq", "a")),
            _llava("two-tags", ("<image>\n<image>\nq", "a")),
        ],
        jsonl=True,
    )
    err = _error(
        capsys,
        "--refusal_source",
        REFUSAL,
        "--normal_source",
        bad,
        "--num_refusal",
        0,
        "--num_normal",
        2,
        "--output",
        tmp_path / "o.jsonl",
    )
    assert (
        f"{bad}: record 1 (id 'two-tags'), field 'images': 2 <image> placeholder(s) in the user "
        "text but 1 image(s)"
    ) in err


@pytest.mark.parametrize("fraction", ["1.5", "-0.1", "nan", "inf"])
def test_fraction_outside_unit_interval(tmp_path, capsys, fraction):
    err = _error(
        capsys,
        "--refusal_source",
        REFUSAL,
        "--normal_source",
        NORMAL,
        "--refusal_fraction",
        fraction,
        "--total",
        10,
        "--output",
        tmp_path / "o.jsonl",
    )
    assert f"--refusal_fraction must be within [0, 1], got {float(fraction)}" in err


@pytest.mark.parametrize("content", ["[]", "", "\n"])
def test_empty_data(tmp_path, capsys, content):
    empty = tmp_path / "empty.json"
    empty.write_text(content, encoding="utf-8")
    err = _error(
        capsys,
        "--refusal_source",
        REFUSAL,
        "--normal_source",
        empty,
        "--num_refusal",
        1,
        "--num_normal",
        1,
        "--output",
        tmp_path / "o.jsonl",
    )
    assert f"{empty}: " in err and "no records" in err


def test_nothing_to_write(tmp_path, capsys):
    err = _error(
        capsys, "--refusal_source", REFUSAL, "--num_refusal", 0, "--output", tmp_path / "o.jsonl"
    )
    assert "the mix is empty" in err


def test_asking_for_more_than_a_source_holds(tmp_path, capsys):
    err = _error(
        capsys,
        "--refusal_source",
        REFUSAL,
        "--normal_source",
        NORMAL,
        "--num_refusal",
        10,
        "--output",
        tmp_path / "o.jsonl",
    )
    assert f"10 refusal record(s) asked for but {REFUSAL} holds 9" in err
    err = _error(
        capsys,
        "--refusal_source",
        REFUSAL,
        "--normal_source",
        NORMAL,
        "--num_refusal",
        9,
        "--num_normal",
        11,
        "--output",
        tmp_path / "o.jsonl",
    )
    assert f"11 normal record(s) asked for but {NORMAL} holds only 10 not sharing an id" in err


def test_only_follow_up_questions(tmp_path, capsys):
    """Upstream loops forever on such a record; mix names it."""
    bad = _write(
        tmp_path / "loop.json",
        [_llava("f", ("What about <image>?", "x"), ("what about this?", "y"))],
    )
    err = _error(
        capsys,
        "--refusal_source",
        bad,
        "--num_refusal",
        1,
        "--random_choose",
        "--output",
        tmp_path / "o.jsonl",
    )
    assert f"{bad}: record 0 (id 'f'): no turn pair to keep" in err


def test_turn_pair_out_of_order(tmp_path, capsys):
    bad = _write(
        tmp_path / "order.json",
        [
            {
                "id": "g",
                "image": "a.jpg",
                "conversations": [
                    {"from": "gpt", "value": "Hello."},
                    {"from": "human", "value": "<image>\nq"},
                ],
            }
        ],
    )
    err = _error(
        capsys,
        "--refusal_source",
        bad,
        "--num_refusal",
        1,
        "--random_choose",
        "--output",
        tmp_path / "o.jsonl",
    )
    assert f"{bad}: record 0 (id 'g'), field 'turns 0-1': turn pair 1 is ('assistant'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_refusal", 1, "--refusal_fraction", 0.5, "--total", 4], "not both"),
        (["--refusal_fraction", 0.5], "--refusal_fraction needs --total"),
        (["--num_refusal", 1, "--total", 4], "--total goes with --refusal_fraction"),
        ([], "give --num_refusal"),
        (["--num_refusal", -1], "counts must be >= 0"),
        (["--num_refusal", 1, "--num_normal", 1, "--normal_source", ""], "no --normal_source"),
        (["--num_refusal", 1, "--official", "--refusal_sentences", "a", "b"], "exactly one"),
        (["--num_refusal", 1, "--refusal_sentences", " "], "must be non-empty"),
    ],
)
def test_option_errors(tmp_path, capsys, argv, message):
    err = _error(capsys, "--refusal_source", REFUSAL, "--output", tmp_path / "o.jsonl", *argv)
    assert message in err


def test_output_may_not_overwrite_an_input(tmp_path, capsys):
    copy = _write(tmp_path / "in.json", json.loads(REFUSAL.read_text(encoding="utf-8")))
    err = _error(capsys, "--refusal_source", copy, "--num_refusal", 1, "--output", copy)
    assert "would overwrite the input" in err


def test_arguments_dataclass_is_usable_from_python(tmp_path):
    args = MixArguments(
        refusal_source=str(REFUSAL),
        normal_source=str(NORMAL),
        output=str(tmp_path / "x.jsonl"),
        num_refusal=2,
        num_normal=2,
    )
    result = mix(args)
    assert len(result.records) == 4 and result.manifest["counts"]["total"] == 4


def test_turn_choice_repairs_a_missing_placeholder_as_upstream_does(tmp_path, capsys):
    """With --random_choose the kept human turn gets its <image> at the front, so a refusal
    record whose text lacks the placeholder is usable (and checked after the repair); without
    the turn choice it is a placeholder/image mismatch."""
    records = [
        _llava("no-tag", ("What is shown?", "A cat."), ("And the colour?", "Grey.")),
        _llava("tagged", ("<image>\nWhat is it?", "A dog.")),
    ]
    first = _write(tmp_path / "first.json", records)
    for seed in range(3):
        expected = upstream.upstream_mix(
            str(first), str(NORMAL), 2, 3, seed=seed, random_choose=True, change_reply=True
        )
        reference = tmp_path / "upstream.json"
        upstream.save(expected, str(reference))
        out = tmp_path / "official.json"
        assert (
            _run("--official", "--refusal_source", first, "--normal_source", NORMAL, "--seed",
                 seed, "--num_refusal", 2, "--num_normal", 3, "--random_choose", "--output", out)
            == 0
        )  # fmt: skip
        assert out.read_bytes() == reference.read_bytes()
        out = tmp_path / "default.jsonl"
        assert (
            _run("--refusal_source", first, "--num_refusal", 2, "--seed", seed,
                 "--random_choose", "--output", out)
            == 0
        )  # fmt: skip
        for record in iter_records(out):
            user = record["messages"][0]["content"]
            assert user.startswith("<image>\n") and user.count("<image>") == 1
    err = _error(capsys, "--refusal_source", first, "--num_refusal", 2, "--output",
                 tmp_path / "plain.jsonl")  # fmt: skip
    assert "(id 'no-tag'), field 'images': 0 <image> placeholder(s)" in err
