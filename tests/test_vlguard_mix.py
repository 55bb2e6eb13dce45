"""VLGuard's train.json as a refusal source of ``mix``; the image ablations of refusal records.

The yardstick is upstream restated here, sharing no code with rejalign: VLGuard's
``convert_to_llava_format.py`` (GitHub ys-zong/VLGuard at a2f85c9: ``random.seed(0)``, a shuffle
of each safe image's two pairs, ``<image>`` glued to the first instruction, ``json.dump(indent=2)``)
followed by the paper's ``mix_rejection_data.py`` (tests/fixtures/upstream_mix.py), each step
writing and reading its file as upstream does.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from rejalign_train.image_ablation import SIZE, images_dir
from rejalign_train.mixing import REFUSAL_SENTENCE, main, manifest_path

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = FIXTURES / "mix" / "vlguard_train.json"
NORMAL = FIXTURES / "mix" / "normal.json"


def _load_yardstick():
    spec = importlib.util.spec_from_file_location("upstream_mix", FIXTURES / "upstream_mix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


upstream = _load_yardstick()


def upstream_convert(train_json: Path, out: Path) -> Path:
    """VLGuard's convert_to_llava_format.py, statement for statement (paths as arguments)."""
    with open(train_json) as f:
        train_data = json.load(f)
    random.seed(0)

    def format_conversation(instruction_key, response, prepend_image=False):
        if prepend_image:
            human_value = f"<image>{response[instruction_key]}"
        else:
            human_value = response[instruction_key]
        return [
            {"from": "human", "value": human_value},
            {"from": "gpt", "value": response["response"]},
        ]

    for item in train_data:
        item["conversations"] = []
        instruction_responses = item["instr-resp"]
        if len(instruction_responses) > 1:
            random.shuffle(instruction_responses)
            first, second = instruction_responses[0], instruction_responses[1]
            item["conversations"].extend(
                format_conversation(list(first.keys())[0], first, prepend_image=True)
            )
            item["conversations"].extend(
                format_conversation(list(second.keys())[0], second, prepend_image=False)
            )
        else:
            item["conversations"].extend(
                format_conversation("instruction", instruction_responses[0], prepend_image=True)
            )
        item.pop("instr-resp")
    with open(out, "w") as f:
        json.dump(train_data, f, indent=2)
    return out


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


def _read(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _manifest(out: Path) -> dict:
    return json.loads(manifest_path(out).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def train_json(data_dir) -> Path:
    path = data_dir / "vlguard" / "train.json"
    assert len(json.loads(path.read_text(encoding="utf-8"))) == 2000
    return path


# --------------------------------------------------------------------------- byte for byte


@pytest.mark.parametrize("change_reply", [True, False])
def test_official_mix_of_vlguard_train_equals_upstreams_two_steps(
    train_json, tmp_path, change_reply
):
    """The paper's recipe on VLGuard: all 2000 records + normal data, --random_choose."""
    converted = upstream_convert(train_json, tmp_path / "train_llava_format.json")
    expected = upstream.upstream_mix(
        str(converted), str(NORMAL), 2000, 10, random_choose=True, change_reply=change_reply
    )
    reference = tmp_path / "upstream.json"
    upstream.save(expected, str(reference))
    out = tmp_path / "mixed.json"
    argv = ["--official", "--random-choose", "--refusal-source", train_json]
    argv += ["--normal-source", NORMAL, "--num-refusal", 2000, "--num-normal", 10]
    argv += ["--output", out] + ([] if change_reply else ["--no-change-reply"])
    assert _run(*argv) == 0
    assert out.read_bytes() == reference.read_bytes()
    manifest = _manifest(out)
    assert manifest["counts"] == {"refusal": 2000, "normal": 10, "total": 2010}
    assert manifest["inputs"]["refusal"]["layout"] == "vlguard"
    assert manifest["inputs"]["refusal"]["vlguard"]["subset"] == "all"
    assert manifest["vlguard_subset"] == "all" and manifest["change_reply"] is change_reply
    # Upstream's <image> fix-up on VLGuard's glued placeholder, kept as upstream writes it.
    assert any(r["conversations"][0]["value"].startswith("<image>\n<image>") for r in expected)
    replies = Counter(r["conversations"][1]["value"] == REFUSAL_SENTENCE for r in expected)
    assert replies[True] == (2000 if change_reply else 0)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("choose", [True, False])
def test_official_mix_on_the_small_fixture(tmp_path, seed, choose):
    """Every option on a file that has what the real one has, plus a duplicate id shared
    with nothing and non-ASCII text (upstream's convert writes \\u escapes, mix reads them)."""
    converted = upstream_convert(SMALL, tmp_path / "train_llava_format.json")
    assert "\\u00e9" in converted.read_text()
    expected = upstream.upstream_mix(
        str(converted), str(NORMAL), 6, 5, seed=seed, random_choose=choose, change_reply=True
    )
    reference = tmp_path / "upstream.json"
    upstream.save(expected, str(reference))
    out = tmp_path / "mixed.json"
    argv = ["--official", "--refusal-source", SMALL, "--normal-source", NORMAL, "--seed", seed]
    argv += ["--num-refusal", 6, "--num-normal", 5, "--output", out]
    assert _run(*argv, *(["--random-choose"] if choose else [])) == 0
    assert out.read_bytes() == reference.read_bytes()


def test_conversion_keeps_upstreams_quirks(tmp_path):
    """No newline after <image>; pair order from the seeded shuffle; fields kept, pairs gone."""
    converted = json.loads(upstream_convert(SMALL, tmp_path / "c.json").read_text())
    raw = json.loads(SMALL.read_text(encoding="utf-8"))
    for before, after in zip(raw, converted, strict=True):
        assert list(after) == [k for k in before if k != "instr-resp"] + ["conversations"]
        first = after["conversations"][0]["value"]
        assert first.startswith("<image>") and not first.startswith("<image>\n")
        assert len(after["conversations"]) == 2 * len(before["instr-resp"])
    orders = set()
    for before, after in zip(raw, converted, strict=True):
        if before["safe"]:
            first = after["conversations"][0]["value"].removeprefix("<image>")
            orders |= {k for p in before["instr-resp"] for k, v in p.items() if v == first}
    assert orders == {"safe_instruction", "unsafe_instruction"}  # the shuffle did shuffle


# --------------------------------------------------------------------------- subsets


def _default_mix(tmp_path: Path, source: Path, k1: int, *extra: object, name="mixed.jsonl"):
    out = tmp_path / name
    argv = ["--refusal-source", source, "--num-refusal", k1, "--output", out, *extra]
    assert _run(*argv) == 0
    return _read(out), _manifest(out), out


def _expected(source: dict, subset: str) -> list | None:
    """The (human, gpt) texts the subset makes of a source record (None: not in the subset),
    the human text without its leading placeholder; for pairs in either order, sorted."""
    pairs = source["instr-resp"]
    if subset == "unsafes" or (subset == "all" and not source["safe"]):
        return None if source["safe"] else [(pairs[0]["instruction"], pairs[0]["response"])]
    if not source["safe"]:
        return None
    texts = [(p.get("safe_instruction") or p["unsafe_instruction"], p["response"]) for p in pairs]
    if subset == "safe_unsafes":
        return [t for t, p in zip(texts, pairs, strict=True) if "unsafe_instruction" in p]
    return sorted(texts)


@pytest.mark.parametrize(
    ("subset", "count"),
    [("all", 2000), ("unsafes", 1023), ("safe_unsafes", 977), ("contrastive", 977)],
)
def test_subsets_of_vlguard_train(train_json, tmp_path, subset, count):
    raw: dict[str, list] = {}
    for r in json.loads(train_json.read_text(encoding="utf-8")):
        raw.setdefault(r["image"], []).append(r)  # one image holds two records
    records, manifest, _ = _default_mix(
        tmp_path, train_json, count, "--vlguard-subset", subset, "--no-change-reply"
    )
    assert len(records) == count
    assert manifest["vlguard_subset"] == subset
    info = manifest["inputs"]["refusal"]["vlguard"]
    assert info == {**info, "subset": subset, "records_in_file": 2000, "records_in_subset": count}
    for record in records:
        turns = record["conversations"]
        humans = [t["value"] for t in turns if t["from"] == "human"]
        # Upstream's placeholder, glued to the first instruction (no --random-choose here).
        assert humans[0].startswith("<image>") and sum(h.count("<image>") for h in humans) == 1
        got = [
            (turns[i]["value"].removeprefix("<image>"), turns[i + 1]["value"])
            for i in range(0, len(turns), 2)
        ]
        if len(got) == 2:
            got = sorted(got)
        assert got in [_expected(s, subset) for s in raw[record["image"]]]
    assert Counter(len(r["conversations"]) for r in records) == {
        "all": {2: 1023, 4: 977},
        "unsafes": {2: 1023},
        "safe_unsafes": {2: 977},
        "contrastive": {4: 977},
    }[subset]


def test_subset_needs_vlguard_format(tmp_path, capsys):
    argv = ["--refusal-source", NORMAL, "--num-refusal", 2, "--output", tmp_path / "m.jsonl"]
    assert _run(*argv, "--vlguard-subset", "unsafes") == 2
    err = capsys.readouterr().err
    assert "normal.json" in err and "--vlguard_subset unsafes needs VLGuard" in err


def test_bad_vlguard_record_is_named(tmp_path, capsys):
    records = json.loads(SMALL.read_text(encoding="utf-8"))
    del records[3]["instr-resp"][1]["response"]
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps(records))
    assert _run("--refusal-source", bad, "--num-refusal", 2, "--output", tmp_path / "m.jsonl") == 2
    err = capsys.readouterr().err
    assert "record 3 (id 'Privacy_4'), field 'instr-resp[1].response'" in err


# --------------------------------------------------------------------------- image ablations


def _by_id(records):
    return {(r["id"], r.get("image", "")): r for r in records}


@pytest.mark.parametrize("official", [False, True])
def test_blank_noise_and_drop_change_only_the_refusal_images(tmp_path, official):
    name = "mixed.json" if official else "mixed.jsonl"
    mode = ["--official"] if official else []
    common = [*mode, "--normal-source", NORMAL, "--num-normal", 4, "--random-choose"]
    kept, _, _ = _default_mix(tmp_path / "keep", SMALL, 6, *common, name=name)
    normals = [r for r in kept if not str(r["id"]).startswith(("Ads", "HOD", "Priv", "Safe"))]
    assert len(normals) == 4
    for ablation in ("blank", "noise", "drop"):
        folder = tmp_path / ablation
        records, manifest, out = _default_mix(
            folder, SMALL, 6, *common, "--refusal-images", ablation, name=name
        )
        info = manifest["refusal_images"]
        assert info["mode"] == ablation and info["records_changed"] == 6
        # Same draw, same order; the normal records as they were.
        assert [r["id"] for r in records] == [r["id"] for r in kept]
        assert [r for r in records if r in normals] == normals
        refusals = [r for r in records if r not in normals]
        assert len(refusals) == 6
        for before, after in zip([r for r in kept if r not in normals], refusals, strict=True):
            assert [t["from"] for t in after["conversations"]] == ["human", "gpt"]
            assert after["conversations"][1] == before["conversations"][1]
            if ablation == "drop":
                assert "image" not in after
                assert "<image>" not in after["conversations"][0]["value"]
                assert after["conversations"][0]["value"] == (
                    before["conversations"][0]["value"].replace("<image>\n", "")
                ).replace("<image>", "")
            else:
                assert Path(after["image"]).parent.parent.name in (folder.name, "mixed.images")
                assert Path(after["image"]).is_absolute() and Path(after["image"]).is_file()
                assert after["conversations"][0] == before["conversations"][0]
        images = sorted(images_dir(out).rglob("*.png"))
        if ablation == "drop":
            assert images == [] and info["files"] == 0
            continue
        assert info["size"] == list(SIZE) and info["files"] == len(images)
        paths = {r["image"] for r in refusals}
        assert paths == {str(p) for p in images}
        if ablation == "blank":
            assert len(images) == 1
            with Image.open(images[0]) as im:
                assert im.size == SIZE and im.getextrema() == ((255, 255),) * 3
        else:
            assert len(images) == 6  # one per refusal record
            pixels = set()
            for path in images:
                with Image.open(path) as im:
                    assert im.size == SIZE and im.getextrema() == ((0, 255),) * 3
                    pixels.add(im.tobytes()[:64])
            assert len(pixels) == 6
            # Deterministic: a rerun writes the same pixels, the same records.
            again, _, out2 = _default_mix(
                tmp_path / "again", SMALL, 6, *common, "--refusal-images", ablation, name=name
            )
            for a, b in zip(images, sorted(images_dir(out2).rglob("*.png")), strict=True):
                with Image.open(a) as ia, Image.open(b) as ib:
                    assert ia.tobytes() == ib.tobytes()
            assert [r.get("image", "")[-16:] for r in again] == [
                r.get("image", "")[-16:] for r in records
            ]


def test_a_rerun_without_ablation_removes_stale_images(tmp_path):
    _default_mix(tmp_path, SMALL, 3, "--refusal-images", "noise")
    assert len(list(images_dir(tmp_path / "mixed.jsonl").rglob("*.png"))) == 3
    records, manifest, out = _default_mix(tmp_path, SMALL, 3)
    assert not images_dir(out).exists()
    assert manifest["refusal_images"]["mode"] == "keep"
    assert all(not Path(r["image"]).is_absolute() for r in records)


@pytest.mark.parametrize("official", [False, True])
def test_refusal_image_root_makes_the_refusal_images_absolute(tmp_path, official):
    """VLGuard's images sit in its train/ folder, the normal data's under fit's --image_root."""
    name = "mixed.json" if official else "mixed.jsonl"
    mode = ["--official"] if official else []
    common = [*mode, "--normal-source", NORMAL, "--num-normal", 3]
    kept, _, _ = _default_mix(tmp_path / "a", SMALL, 4, *common, name=name)
    root = tmp_path / "VLGuard" / "train"
    records, manifest, _ = _default_mix(
        tmp_path / "b", SMALL, 4, *common, "--refusal-image-root", root, name=name
    )
    assert manifest["refusal_images"]["root"] == str(root.resolve())
    assert manifest["refusal_images"]["records_changed"] == 4
    for before, after in zip(kept, records, strict=True):
        if str(before["id"]).startswith(("Ads", "HOD", "Priv", "Safe")):
            assert after["image"] == str(root.resolve() / before["image"])
        else:
            assert after == before
