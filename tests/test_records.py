"""Reading, checking and writing conversation records (rejalign_train.records, .record_writer)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rejalign_train.record_writer import dump_json_array, to_llava, to_messages, write_records
from rejalign_train.records import RecordError, RecordFile, iter_records, normalise

FIXTURES = Path(__file__).parent / "fixtures" / "mix"


def _write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def _write_jsonl(path: Path, values) -> Path:
    path.write_text(
        "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values), encoding="utf-8"
    )
    return path


LLAVA = [
    {
        "id": "a",
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Grey."},
        ],
    },
    {
        "id": 12,
        "conversations": [
            {"from": "human", "value": "Hello"},
            {"from": "gpt", "value": "Hi — ça va?"},
        ],
    },
    {
        "id": "two",
        "image": ["x.jpg", "y.jpg"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\n<image>\nSame?"},
            {"from": "gpt", "value": "No."},
        ],
    },
]
NORMALISED = [
    {
        "id": "a",
        "images": ["a.jpg"],
        "messages": [
            {"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "Grey."},
        ],
    },
    {
        "id": "12",
        "images": [],
        "messages": [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi — ça va?"},
        ],
    },
    {
        "id": "two",
        "images": ["x.jpg", "y.jpg"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\n<image>\nSame?"},
            {"role": "assistant", "content": "No."},
        ],
    },
]


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_llava_records_normalise_in_both_layouts(tmp_path, layout):
    path = tmp_path / f"data.{layout}"
    (_write_json if layout == "json" else _write_jsonl)(path, LLAVA)
    assert list(iter_records(path)) == NORMALISED
    with RecordFile(path) as source:
        assert source.layout == layout
        assert len(source) == 3
        assert source.ids() == ["a", 12, "two"]
        assert [source.load(i) for i in range(3)] == LLAVA


def test_messages_records_normalise_like_llava(tmp_path):
    """The messages layout (TRL / LLaMA-Factory) with string or list-of-parts content."""
    messages = [
        {
            "id": "a",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                {"role": "user", "content": "Colour?"},
                {"role": "assistant", "content": "Grey."},
            ],
            "images": ["a.jpg"],
        },
        {
            "id": 12,
            "messages": [
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi — ça va?"},
            ],
        },
        {
            "id": "two",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>\n<image>\nSame?"},
                {"role": "assistant", "content": "No."},
            ],
            "images": ["x.jpg", "y.jpg"],
        },
    ]
    path = _write_jsonl(tmp_path / "m.jsonl", messages)
    assert list(iter_records(path)) == NORMALISED


def test_missing_id_gets_a_positional_one():
    records = list(iter_records(FIXTURES / "messages.jsonl"))
    assert [r["id"] for r in records] == ["m-1", "messages.jsonl:1", "7"]
    assert records[1]["messages"][0]["content"] == "<image>\nDescribe the scene."


def test_record_file_matches_json_load_exactly(tmp_path):
    """Parsed records are what json.load gives: floats, big ints, key order, duplicate keys."""
    text = (
        '[{"id": "d", "b": 1, "a": 2, "b": 3, "conversations": []},\n'
        ' {"id": 99999999999999999999, "x": 1e16, "y": -0.0, "z": "\\u00e9\\ud83d\\ude00"},\n'
        ' {"nested": {"id": "not me"}}]'
    )
    path = tmp_path / "odd.json"
    path.write_text(text, encoding="utf-8")
    expected = json.loads(text)
    with RecordFile(path) as source:
        loaded = [source.load(i) for i in range(len(source))]
        assert loaded == expected
        assert list(loaded[0]) == list(expected[0])  # key order, first position of 'b'
        assert source.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
        # ids beyond 64 bits stay exact integers, as json gives them
        assert source.ids() == ["d", 99999999999999999999, None]


def test_non_json_literals_are_rejected_with_their_position(tmp_path):
    """Python's json accepts NaN; JSON (and msgspec's scanner) does not: say where it is."""
    path = tmp_path / "nan.json"
    path.write_text('[\n  {"id": "a"},\n  {"id": "b", "score": NaN}\n]', encoding="utf-8")
    with pytest.raises(RecordError, match=r"nan\.json: not a valid JSON array.* line 3, column 24"):
        RecordFile(path)


def test_ids_scan_reports_absent_ids_and_ignores_nested_ones(tmp_path):
    path = _write_json(tmp_path / "ids.json", [{"id": "a"}, {"nested": {"id": "x"}}, {"id": 3}])
    with RecordFile(path) as source:
        assert source.ids() == ["a", None, 3]
    path = _write_json(tmp_path / "float.json", [{"id": "a"}, {"id": 2.5}])
    with (
        RecordFile(path) as source,
        pytest.raises(
            RecordError,
            match=r"float\.json: record 1, field 'id': an id must be a string or an int",
        ),
    ):
        source.ids()


@pytest.mark.parametrize(
    ("records", "pattern"),
    [
        (
            [LLAVA[0], {"id": "q", "conversations": [{"from": "human", "value": "Hi"}]}],
            r"data\.json: record 1 \(id 'q'\), field 'conversations': no assistant turn",
        ),
        (
            [{"id": "p", "image": "a.jpg", "conversations": LLAVA[1]["conversations"]}],
            r"data\.json: record 0 \(id 'p'\), field 'images': 0 <image> placeholder\(s\) "
            r"in the user text but 1 image\(s\)",
        ),
        (
            [{"id": "p", "conversations": LLAVA[0]["conversations"]}],
            r"record 0 \(id 'p'\), field 'images': 1 <image> placeholder\(s\) in the user text "
            r"but 0 image\(s\)",
        ),
        (
            [
                {
                    "id": "r",
                    "image": "a.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nHi"},
                        {"from": "gpt", "value": "<image> back"},
                    ],
                }
            ],
            r"record 0 \(id 'r'\), field 'turn 1': <image> appears in a assistant turn",
        ),
        (
            [{"id": "s", "conversations": [{"from": "bot", "value": "x"}]}],
            r"record 0 \(id 's'\), field 'conversations\[0\]\.from': unknown speaker 'bot'",
        ),
        (
            [{"id": "t", "conversations": [{"from": "human", "value": 3}]}],
            r"record 0 \(id 't'\), field 'conversations\[0\]\.value': must be a string",
        ),
        (
            [{"id": "u", "messages": [{"role": "robot", "content": "x"}]}],
            r"record 0 \(id 'u'\), field 'messages\[0\]\.role': unknown role 'robot'",
        ),
        (
            [{"id": "v", "messages": [{"role": "user", "content": [{"type": "video"}]}]}],
            r"record 0 \(id 'v'\), field 'messages\[0\]\.content\[0\]'",
        ),
        (
            [{"id": "w", "text": "no conversation"}],
            r"record 0 \(id 'w'\): no conversation: expected 'conversations'",
        ),
        ([{"id": ["x"], "conversations": []}], r"record 0 \(id \['x'\]\), field 'id'"),
        ([["not", "an", "object"]], r"record 0: a record must be a JSON object"),
        ([{"id": "x", "conversations": []}], r"field 'conversations': must be a non-empty list"),
        (
            [{"id": "y", "image": 5, "conversations": LLAVA[1]["conversations"]}],
            r"record 0 \(id 'y'\), field 'image': must be an image path",
        ),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, records, pattern):
    path = _write_json(tmp_path / "data.json", records)
    with pytest.raises(RecordError, match=pattern) as info:
        list(iter_records(path))
    assert str(path) in str(info.value)


def test_errors_are_raised_while_streaming(tmp_path):
    """Records before a bad one are yielded first: the file is not parsed up front."""
    bad = {"id": "bad", "conversations": [{"from": "human", "value": "?"}]}
    path = _write_jsonl(tmp_path / "s.jsonl", [LLAVA[0], LLAVA[1], bad])
    stream = iter_records(path)
    assert next(stream)["id"] == "a"
    assert next(stream)["id"] == "12"
    with pytest.raises(RecordError, match=r"record 2 \(id 'bad'\)"):
        next(stream)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("", r"empty\.json: empty file: no records"),
        ("  \n\n ", r"empty\.json: empty file: no records"),
        ("[]", r"empty\.json: no records \(empty data\)"),
        ("[\n]\n", r"empty\.json: no records \(empty data\)"),
        ('[{"id": 1}', r"empty\.json: not a valid JSON array of records"),
        ('"just a string"', r"empty\.json: neither a JSON array nor JSON Lines"),
    ],
)
def test_empty_or_unreadable_files(tmp_path, content, pattern):
    path = tmp_path / "empty.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RecordError, match=pattern):
        list(iter_records(path))


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(LLAVA[1])
    path.write_text(f"{good}\n\n{good}\n{{oops\n", encoding="utf-8")
    with RecordFile(path) as source:
        assert len(source) == 3  # the blank line is not a record
        with pytest.raises(RecordError, match=r"broken\.jsonl: record 2: invalid JSON \(line 4\)"):
            source.load(2)
        with pytest.raises(RecordError, match=r"broken\.jsonl: record 2: invalid JSON \(line 4\)"):
            source.ids()
    path.write_text(f"{good}\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"record 1: a record must be a JSON object"):
        list(iter_records(path))


def test_json_array_element_that_is_not_an_object_fails_indexing(tmp_path):
    path = _write_json(tmp_path / "mixed.json", [{"id": "a"}, "text", {"id": "b"}])
    with pytest.raises(RecordError, match=r"mixed\.json: record 1: a record must be a JSON object"):
        RecordFile(path)


@pytest.mark.parametrize("record_format", ["llava", "messages"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_write_then_read_round_trips(tmp_path, record_format, suffix):
    path = tmp_path / f"out{suffix}"
    written = write_records(path, NORMALISED, record_format=record_format)
    assert written.records == 3
    assert written.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert list(iter_records(path)) == NORMALISED
    if suffix == ".json":
        convert = to_llava if record_format == "llava" else to_messages
        expected = json.dumps([convert(r) for r in NORMALISED], ensure_ascii=False, indent=4)
        assert path.read_text(encoding="utf-8") == expected
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["id"] for line in lines] == ["a", "12", "two"]
        assert "ça va" in lines[1]  # non-ASCII kept, not escaped


def test_llava_output_shape():
    assert to_llava(NORMALISED[0])["image"] == "a.jpg"
    assert "image" not in to_llava(NORMALISED[1])
    assert to_llava(NORMALISED[2])["image"] == ["x.jpg", "y.jpg"]
    assert to_llava(NORMALISED[2])["conversations"][0] == {"from": "system", "value": "Be brief."}


def test_write_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("previous\n", encoding="utf-8")

    def records():
        yield NORMALISED[0]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_records(path, records())
    assert path.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


@pytest.mark.parametrize(
    "value",
    [
        [],
        [{}],
        [{"a": [], "b": {}, "c": [[]], "d": {"e": {}}}],
        [{"s": '\u2028\u2029/é\x00\x1f\x7f"\\ \U0001f600 \t\n\r\b\f', "n": [1, -2, 2**70]}],
        [{"t": True, "f": False, "z": None}],
        [{"x": 1e16, "y": 1e-07, "w": -0.0, "v": float("nan"), "u": float("inf")}],
        json.loads((FIXTURES / "normal.json").read_text(encoding="utf-8")),
    ],
)
def test_dump_json_array_is_json_dumps_indent_4(value):
    expected = json.dumps(value, ensure_ascii=False, indent=4).encode("utf-8")
    assert dump_json_array(value) == expected


def test_normalise_accepts_single_record_api():
    record = normalise(LLAVA[0], "somewhere.json", 5)
    assert record == NORMALISED[0]
    with pytest.raises(RecordError, match=r"somewhere\.json: record 5 \(id 'z'\)"):
        normalise(
            {"id": "z", "conversations": [{"from": "gpt", "value": "<image>"}]}, "somewhere.json", 5
        )


def test_background_hash_is_awaited_before_unmapping(tmp_path):
    """Hashing runs in a thread over the map; closing (or failing to index) waits for it."""
    good = _write_json(tmp_path / "good.json", LLAVA * 200)
    expected = hashlib.sha256(good.read_bytes()).hexdigest()
    with RecordFile(good, sha256=True) as source:
        pass  # closed at once, while the thread may still be hashing
    with RecordFile(good, sha256=True) as source:
        assert len(source) == 600
        assert source.sha256() == expected == source.sha256()
    bad = tmp_path / "bad.json"
    bad.write_bytes(good.read_bytes()[:-10])  # truncated: indexing fails
    with pytest.raises(RecordError, match=r"bad\.json: not a valid JSON array"):
        RecordFile(bad, sha256=True)
