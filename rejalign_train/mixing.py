"""``rejalign-train mix``: benign instruction data in which a share of the replies is a refusal.

The paper's training set (upstream ``utils/mix_rejection_data.py``): draw ``num_refusal`` records
from a benign source (LLaVA-Med in the paper), optionally keep one human/gpt turn pair of each
(``--random_choose``), replace that reply by one refusal sentence, draw ``num_normal`` records
from normal instruction data (LLaVA v1.5 mix665k) excluding the ids already drawn, concatenate
(refusals first) and shuffle. All randomness comes from one ``random.Random(seed)`` used in
upstream's exact order of calls:

1. ``sample(records_1, k1)``;
2. ``sample(records_2 whose id is not among the k1 drawn ids, k2)`` (``--similar``: whose id is);
3. with ``--random_choose``, for each drawn refusal record in draw order,
   ``choice(range(1, n_pairs + 1))`` until the picked human turn lacks "what about";
4. ``shuffle(refusals + normals)``.

``random.sample`` touches its population only through ``len()`` and indexing, so drawing from
``range(n)`` gives the same positions as drawing from a list of ``n`` records. Records are
therefore never loaded wholesale: the files are indexed (:class:`~rejalign_train.records.
RecordFile`), the exclusion is a set lookup per id instead of upstream's scan of a list, and only
the drawn records are parsed.

Two modes share that algorithm:

* default: input in LLaVA or messages format (JSON or JSONL), output as normalised records
  (LLaVA JSONL by default), a pool of refusal sentences sampled per record from a second
  generator (so the pool never changes which records are drawn or their order), asking for more
  records than a source holds is an error, and the ``<image>`` fix-up after the turn choice gives
  each record exactly one placeholder per image;
* ``--official``: the records upstream writes, in its order, unchanged otherwise (a ``.json``
  output is byte-identical to upstream's file): counts are clipped to the source sizes as upstream
  clips them, the ``<image>`` fix-up is upstream's literal one, one refusal sentence.

Both modes reject bad input that upstream would crash on, loop forever on, or silently train on:
see :func:`rejalign_train.records.normalise`.

VLGuard's ``train.json`` is read as a refusal source directly, converted as upstream's
``convert_to_llava_format.py`` does (:mod:`rejalign_train.vlguard`; ``--vlguard_subset`` picks the
ablations' subsets), so that ``--official`` on it equals upstream's two steps. The refusal
records' images can be replaced by blank or noise images, or dropped (``--refusal_images``,
:mod:`rejalign_train.image_ablation`); the manifest records both.
"""

from __future__ import annotations

import json
import math
import operator
import random
import sys
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any, Literal

from rejalign_tasks.console import run_command, split_config
from rejalign_tasks.contracts import IMAGE_PLACEHOLDER, REFUSAL_SENTENCE, write_text_atomic
from rejalign_train.image_ablation import ImageAblation, ImageMode
from rejalign_train.record_writer import layout_for, write_records
from rejalign_train.records import RecordError, RecordFile, check_placeholders, normalise
from rejalign_train.vlguard import Subset, VLGuardSource, open_refusal_source

# Upstream's turn-choice rule skips human turns containing this (case-insensitive): follow-up
# questions ("What about the left one?") make no sense once the earlier turns are cut away.
FOLLOW_UP_MARKER = "what about"
PROG = "rejalign-train mix"
CONFIG_EPILOG = (
    "A .yaml/.yml/.json file given as the first argument sets these options' defaults (names "
    "with - or _); flags after it override it."
)
MANIFEST_SUFFIX = ".manifest.json"


class MixError(ValueError):
    """The mix cannot be made as asked (sizes, sources, options)."""


@dataclass
class MixArguments:
    """Options of ``rejalign-train mix`` (parsed by ``transformers.HfArgumentParser``)."""

    refusal_source: str = field(
        metadata={"help": "File whose drawn records get a refusal reply (paper: LLaVA-Med)."}
    )
    output: str = field(
        metadata={
            "help": "Output file: .jsonl (JSON Lines) or .json (a JSON array). The manifest is "
            f"written beside it as <stem>{MANIFEST_SUFFIX}."
        }
    )
    normal_source: str | None = field(
        default=None,
        metadata={"help": "Normal instruction data, kept as is (paper: LLaVA v1.5 mix665k)."},
    )
    num_refusal: int | None = field(
        default=None, metadata={"help": "Records drawn from --refusal_source."}
    )
    num_normal: int | None = field(
        default=None, metadata={"help": "Records drawn from --normal_source (default 0)."}
    )
    refusal_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Instead of counts: the refusal share of --total, in [0, 1]. "
            "num_refusal = round(fraction * total) (ties to even), num_normal = the rest."
        },
    )
    total: int | None = field(
        default=None, metadata={"help": "Total records when sizing by --refusal_fraction."}
    )
    random_choose: bool = field(
        default=False,
        metadata={
            "help": "Keep one human/gpt turn pair of each refusal record, drawn uniformly, "
            "skipping turns that contain 'what about' (upstream --random_choose)."
        },
    )
    change_reply: bool = field(
        default=True,
        metadata={"help": "Replace the refusal records' reply by a refusal sentence."},
    )
    refusal_sentences: list[str] = field(
        default_factory=lambda: [REFUSAL_SENTENCE],
        metadata={
            "help": "Refusal sentence(s); with several, one is drawn per record (seeded). "
            f"Default: the paper's {REFUSAL_SENTENCE!r}."
        },
    )
    refusal_sentences_file: str | None = field(
        default=None,
        metadata={"help": "A text file of refusal sentences, one a line (replaces the above)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the draw (upstream: 0)."})
    similar: bool = field(
        default=False,
        metadata={
            "help": "Draw normal records among those sharing a drawn refusal id instead "
            "of excluding them (upstream --similar)."
        },
    )
    official: bool = field(
        default=False,
        metadata={
            "help": "Reproduce upstream mix_rejection_data.py exactly: same records, same "
            "order, upstream's record layout (a .json output is byte-identical)."
        },
    )
    record_format: Literal["llava", "messages"] = field(
        default="llava",
        metadata={"help": "Output record format in the default mode (LLaVA or messages)."},
    )
    vlguard_subset: Subset = field(
        default="all",
        metadata={
            "help": "With VLGuard's train.json as --refusal_source (converted as upstream's "
            "convert_to_llava_format.py does): all, unsafes (unsafe images), safe_unsafes (safe "
            "images' unsafe instruction only) or contrastive (safe images with both pairs)."
        },
    )
    refusal_images: ImageMode = field(
        default="keep",
        metadata={
            "help": "Images of the refusal records: keep, blank (one white image), noise (seeded "
            "noise per image) or drop (text only); generated images go to <stem>.images/."
        },
    )
    refusal_image_root: str | None = field(
        default=None,
        metadata={
            "help": "Folder the refusal source's image paths are relative to, when it is not "
            "fit's --image_root (VLGuard's train/ beside LLaVA's data): written as absolute paths."
        },
    )

    def __post_init__(self) -> None:
        self.sentences = self._load_sentences()
        self.sizes = self._resolve_sizes()
        if self.official:
            if len(self.sentences) != 1:
                raise MixError("--official takes exactly one refusal sentence, as upstream")
            if self.record_format != "llava":
                raise MixError("--official writes upstream's LLaVA records; drop --record_format")
        if self.sizes[1] > 0 and not self.normal_source:
            raise MixError(f"{self.sizes[1]} normal record(s) asked for but no --normal_source")
        out = Path(self.output).resolve()
        for source in (self.refusal_source, self.normal_source):
            if source and Path(source).resolve() == out:
                raise MixError(f"--output {self.output} would overwrite the input {source}")

    def _load_sentences(self) -> list[str]:
        if self.refusal_sentences_file:
            try:
                text = Path(self.refusal_sentences_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise MixError(f"{self.refusal_sentences_file}: cannot read ({exc})") from exc
            sentences = [line.strip() for line in text.splitlines() if line.strip()]
            if not sentences:
                raise MixError(f"{self.refusal_sentences_file}: no sentences (empty data)")
            return sentences
        sentences = list(self.refusal_sentences)
        if not sentences or any(not s.strip() for s in sentences):
            raise MixError("--refusal_sentences: every sentence must be non-empty")
        return sentences

    def _resolve_sizes(self) -> tuple[int, int]:
        """(num_refusal, num_normal) from counts or from fraction and total."""
        if self.refusal_fraction is not None:
            if self.num_refusal is not None or self.num_normal is not None:
                raise MixError(
                    "size the mix either by counts (--num_refusal/--num_normal) or by "
                    "--refusal_fraction with --total, not both"
                )
            f = self.refusal_fraction
            if not (math.isfinite(f) and 0.0 <= f <= 1.0):
                raise MixError(f"--refusal_fraction must be within [0, 1], got {f}")
            if self.total is None or self.total < 0:
                raise MixError("--refusal_fraction needs --total, a count >= 0")
            k1 = round(f * self.total)
            return k1, self.total - k1
        if self.total is not None:
            raise MixError("--total goes with --refusal_fraction; with counts give --num_normal")
        if self.num_refusal is None:
            raise MixError(
                "give --num_refusal (and --num_normal), or --refusal_fraction with --total"
            )
        k1, k2 = self.num_refusal, self.num_normal or 0
        if k1 < 0 or k2 < 0:
            raise MixError(f"counts must be >= 0, got num_refusal={k1}, num_normal={k2}")
        return k1, k2


def manifest_path(output: str | Path) -> Path:
    """``mixed.jsonl`` -> ``mixed.manifest.json`` (same folder)."""
    output = Path(output)
    return output.with_name(output.stem + MANIFEST_SUFFIX)


@dataclass
class MixResult:
    """The mixed records (in output order) and what the manifest says about them."""

    records: list[dict]
    manifest: dict[str, Any]
    ablation: ImageAblation | None = None
    image_files: list[Path] = field(default_factory=list)  # what the ablation wrote


def _draw(rng: random.Random, n: int, k: int) -> list[int]:
    """Positions ``rng.sample(list_of_n, k)`` would return, without the list."""
    return rng.sample(range(n), k)


def _source_info(source: RecordFile) -> dict[str, Any]:
    return {
        "path": str(source.path),
        "sha256": source.sha256(),
        "records": len(source),
        "layout": source.layout,
    }


def _require_ids(source: RecordFile, ids: list) -> None:
    if None in ids:
        raise RecordError(
            source.path,
            "no id: --official needs one on every record (upstream reads record['id'])",
            index=ids.index(None),
            field="id",
        )


def _available(ids: list, drawn_ids: set, *, similar: bool) -> Sequence[int]:
    """Positions upstream's filtered list keeps, in order: ids not drawn (``similar``: drawn).

    Set lookups instead of upstream's list scans, mapped over the ids in C.
    """
    if not similar and drawn_ids.isdisjoint(ids):
        return range(len(ids))  # the usual case: two data sets with distinct ids
    drawn = map(drawn_ids.__contains__, ids)
    return array("q", compress(range(len(ids)), drawn if similar else map(operator.not_, drawn)))


def _pick_pair(
    rng: random.Random,
    turns: list,
    speaker: str,
    text: str,
    user: str,
    assistant: str,
    path: Path,
    index: int,
    rid: Any,
) -> int:
    """Upstream's turn choice: 1-based pair number, redrawn while the user turn is a follow-up.

    ``turns`` are the record's turns (without a leading system turn); ``speaker``/``text`` the
    keys of a turn, ``user``/``assistant`` the speaker values of a valid pair.
    """
    n_pairs = len(turns) // 2
    if n_pairs == 0:
        raise RecordError(
            path, "no turn pair to keep (fewer than two turns)", index=index, record_id=rid
        )
    if all(FOLLOW_UP_MARKER in str(turns[2 * p][text]).lower() for p in range(n_pairs)):
        raise RecordError(
            path,
            f"no turn pair to keep: the user turn of each of the {n_pairs} pair(s) contains "
            f"{FOLLOW_UP_MARKER!r} (upstream would loop forever)",
            index=index,
            record_id=rid,
        )
    while True:
        pick = rng.choice(range(1, n_pairs + 1))
        first, second = turns[2 * pick - 2], turns[2 * pick - 1]
        if first[speaker] != user or second[speaker] != assistant:
            raise RecordError(
                path,
                f"turn pair {pick} is ({first[speaker]!r}, {second[speaker]!r}); expected a "
                f"({user!r}, {assistant!r}) pair",
                index=index,
                record_id=rid,
                field=f"turns {2 * pick - 2}-{2 * pick - 1}",
            )
        if FOLLOW_UP_MARKER not in first[text].lower():
            return pick


def _official_refusal(
    raw: dict, rng: random.Random, args: MixArguments, sentence: str, path: Path, index: int
) -> dict:
    """Upstream's edits of one drawn refusal record, on the raw record."""
    conversations = raw["conversations"]
    if args.random_choose:
        pick = _pick_pair(
            rng, conversations, "from", "value", "human", "gpt", path, index, raw.get("id")
        )
        pair = conversations[2 * pick - 2 : 2 * pick]
        value = pair[0]["value"].replace("\n" + IMAGE_PLACEHOLDER, "")
        if not value.startswith(IMAGE_PLACEHOLDER + "\n"):
            value = f"{IMAGE_PLACEHOLDER}\n{value}"
        pair[0]["value"] = value
        raw["conversations"] = pair
    if args.change_reply:
        if len(raw["conversations"]) < 2:
            raise RecordError(
                path,
                "no second turn to replace",
                index=index,
                record_id=raw.get("id"),
                field="conversations",
            )
        raw["conversations"][1]["value"] = sentence
    return raw


def _default_refusal(
    record: dict, rng: random.Random, args: MixArguments, sentence: str, path: Path, index: int
) -> dict:
    """The same edits on a normalised record; a leading system turn is kept and not counted."""
    messages = record["messages"]
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    if args.random_choose:
        pick = _pick_pair(
            rng, turns, "role", "content", "user", "assistant", path, index, record["id"]
        )
        user, reply = dict(turns[2 * pick - 2]), dict(turns[2 * pick - 1])
        text = user["content"].replace("\n" + IMAGE_PLACEHOLDER, "")
        text = text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
        user["content"] = f"{IMAGE_PLACEHOLDER}\n" * len(record["images"]) + text
        turns = [user, reply]
    else:
        turns = [dict(m) for m in turns]
    if args.change_reply:
        first_reply = next(m for m in turns if m["role"] == "assistant")
        first_reply["content"] = sentence
    messages = system + turns
    check_placeholders(messages, record["images"], path, index, record["id"])
    return {"id": record["id"], "images": list(record["images"]), "messages": messages}


def mix(args: MixArguments) -> MixResult:
    """Draw and edit the mix in memory (only the drawn records are ever parsed)."""
    rng = random.Random(args.seed)
    # A second generator for the refusal sentence of each record, so that the sentence pool
    # never changes which records are drawn or their order (upstream has a single sentence).
    sentence_rng = random.Random(f"rejalign-refusal-sentence-{args.seed}")
    want1, want2 = args.sizes
    inputs: dict[str, Any] = {}

    with open_refusal_source(args.refusal_source, args.vlguard_subset) as source1:
        n1 = len(source1)
        if args.official:
            k1 = min(want1, n1)
            _require_ids(source1, source1.ids())
        elif want1 > n1:
            raise MixError(f"{want1} refusal record(s) asked for but {source1.path} holds {n1}")
        else:
            k1 = want1
        picks1 = _draw(rng, n1, k1)
        raws1 = [source1.load(i) for i in picks1]
        # The turn choice rewrites the kept turn's placeholder: check images after it instead.
        checked1 = [
            normalise(raw, source1.path, i, check_images=not args.random_choose)
            for raw, i in zip(raws1, picks1, strict=True)
        ]
        drawn_ids = {raw.get("id") for raw in raws1} - {None}
        inputs["refusal"] = _source_info(source1)
        if isinstance(source1, VLGuardSource):
            inputs["refusal"]["vlguard"] = source1.info()

    raws2: list[dict] = []
    checked2: list[dict] = []
    excluded = 0
    if args.normal_source:
        with RecordFile(args.normal_source, sha256=True) as source2:
            ids2 = source2.ids()
            n2 = len(source2)
            if args.official:
                _require_ids(source2, ids2)
            available = _available(ids2, drawn_ids, similar=args.similar)
            excluded = n2 - len(available)
            del ids2
            k2 = min(want2, n2) if args.official else want2
            if k2 > len(available):
                what = "sharing" if args.similar else "not sharing"
                raise MixError(
                    f"{k2} normal record(s) asked for but {source2.path} holds only "
                    f"{len(available)} {what} an id with the {k1} drawn refusal record(s)"
                    + (" (upstream fails here too)" if args.official else "")
                )
            picks2 = [available[p] for p in _draw(rng, len(available), k2)]
            raws2 = [source2.load(i) for i in picks2]
            checked2 = [
                normalise(raw, source2.path, i) for raw, i in zip(raws2, picks2, strict=True)
            ]
            inputs["normal"] = _source_info(source2)

    sentences = [
        args.sentences[0] if len(args.sentences) == 1 else sentence_rng.choice(args.sentences)
        for _ in range(k1)
    ]
    path1 = Path(args.refusal_source)
    if args.official:
        refusals = [
            _official_refusal(raw, rng, args, s, path1, i)
            for raw, s, i in zip(raws1, sentences, picks1, strict=True)
        ]
        combined = refusals + raws2
    else:
        refusals = [
            _default_refusal(rec, rng, args, s, path1, i)
            for rec, s, i in zip(checked1, sentences, picks1, strict=True)
        ]
        combined = refusals + checked2
    # The ablation edits the refusal records in draw order; it draws nothing from ``rng``.
    ablation = ImageAblation(
        args.refusal_images, Path(args.output), args.seed, args.refusal_image_root
    )
    for position, record in enumerate(refusals):
        (ablation.apply_raw if args.official else ablation.apply_record)(record, position)
    rng.shuffle(combined)

    total = len(combined)
    manifest: dict[str, Any] = {
        "tool": "rejalign-train mix",
        "version": _version(),
        "mode": "official" if args.official else "default",
        "seed": args.seed,
        "requested": {
            "num_refusal": args.num_refusal,
            "num_normal": args.num_normal,
            "refusal_fraction": args.refusal_fraction,
            "total": args.total,
        },
        "counts": {"refusal": k1, "normal": len(raws2), "total": total},
        "refusal_fraction": k1 / total if total else None,
        "refusal_sentences": list(args.sentences),
        "sentence_counts": dict(Counter(sentences)) if args.change_reply else {},
        "random_choose": args.random_choose,
        "change_reply": args.change_reply,
        "similar": args.similar,
        "normal_records_excluded_by_id": excluded,
        "record_format": "upstream" if args.official else args.record_format,
        "vlguard_subset": args.vlguard_subset,
        "refusal_images": ablation.info(),
        "inputs": inputs,
        "arguments": {k: v for k, v in asdict(args).items()},
    }
    return MixResult(combined, manifest, ablation)


def write_mix(args: MixArguments, result: MixResult) -> tuple[Path, Path]:
    """Write the data, then the manifest, each atomically; a stale manifest goes first.

    The manifest is the completion mark: it exists only beside the data it describes.
    """
    output, manifest_file = Path(args.output), manifest_path(args.output)
    if not result.records:
        raise MixError("the mix is empty (0 records asked for): nothing to write")
    manifest_file.unlink(missing_ok=True)
    if result.ablation is not None:
        result.image_files = result.ablation.write()
    written = write_records(
        output, result.records, record_format=None if args.official else args.record_format
    )
    result.manifest["output"] = {
        "path": str(output),
        "sha256": written.sha256,
        "records": written.records,
        "layout": layout_for(output),
    }
    write_text_atomic(manifest_file, json.dumps(result.manifest, indent=2, ensure_ascii=False))
    return output, manifest_file


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rejalign")
    except PackageNotFoundError:
        from rejalign_tasks import __version__

        return __version__


def parse_args(argv: list[str] | None) -> MixArguments:
    """Parse flags, or a YAML/JSON file (first argument) whose values flags may override."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(
        MixArguments,
        prog=PROG,
        description="Benign instruction data in which a share of the replies is a refusal.",
        epilog=CONFIG_EPILOG,
    )
    argv, _ = split_config(parser, argv)
    args, extra = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True, look_for_args_file=False
    )
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """``rejalign-train mix [CONFIG.yaml] [--flags]``: 0 done, 2 bad input, 130 interrupted."""
    return run_command(
        PROG,
        _main,
        argv,
        usage_errors=(MixError, RecordError),
        interrupted="interrupted; rerun the same command to make the mix",
    )


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    result = mix(args)
    output, manifest_file = write_mix(args, result)
    counts = result.manifest["counts"]
    print(
        f"wrote {counts['total']} records ({counts['refusal']} refusal, {counts['normal']} "
        f"normal; refusal fraction {result.manifest['refusal_fraction']:.4f}) to {output}; "
        f"manifest {manifest_file}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
