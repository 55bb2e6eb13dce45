"""The sweep's options: what the user may ask for, checked before the first step runs.

A sweep runs for hours, so every option (the sweep's own and those passed through to ``mix``,
``fit`` and lm-eval) is checked here, by the tools' own parsers where they have one, rather than
by a step that fails halfway through.
"""

# No ``from __future__ import annotations`` here: ``HfArgumentParser`` reads the field types at
# run time.
import contextlib
import io
import json
import math
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rejalign_tasks.console import (
    UsageError,
    apply_config_defaults,
    config_file_arg,
    load_config_file,
)
from rejalign_tasks.contracts import REFUSAL_SENTENCE
from rejalign_train.sweep.arms import Row, arm_sizing, check_arms, row_mix_argv

PROG = "rejalign-sweep"
BASE_LABEL = "base"
DEFAULT_FRACTIONS = ("0", "0.05", "0.1", "0.2")
# FigStep (safety), XSTest (over-refusal) and the utility pair: the paper's columns that need no
# data beyond what rejalign pins or fetches. MM-SafetyBench SD+TYPO needs Stable Diffusion
# images the user must supply, so it is opt-in (--tasks rejalign_paper adds it).
DEFAULT_TASKS = "rejalign_figstep,rejalign_xstest,rejalign_utility"
SECTIONS = ("mix", "fit", "eval")

# Options the sweep sets itself in each tool; a pass-through of one of them is an error that
# says which sweep option to use instead.
RESERVED: dict[str, dict[str, str]] = {
    "mix": {
        "refusal_source": "--refusal-source",
        "normal_source": "--normal-source",
        "output": "the sweep's folder layout",
        "refusal_fraction": "--fractions",
        "total": "--total",
        "num_refusal": "--fractions and --total",
        "num_normal": "--fractions and --total",
    },
    "fit": {
        "model": "--model",
        "data": "the sweep's mix step",
        "output_dir": "the sweep's folder layout",
        "image_root": "--image-root",
        "resume": "--resume-fit",
        "overwrite_output_dir": "the sweep (it redoes unfinished steps itself)",
    },
    "eval": {
        "model": "--backend",
        "M": "--backend",
        "model_args": "--model-args",
        "tasks": "--tasks",
        "t": "--tasks",
        "output_path": "the sweep's folder layout",
        "o": "the sweep's folder layout",
        "config": "sweep options",
        "C": "sweep options",
        "limit": "--limit",
        "L": "--limit",
        "device": "--device",
        "batch_size": "--batch-size",
        "b": "--batch-size",
        "gen_kwargs": "--gen-kwargs",
        "metadata": "--metadata",
    },
}


class SweepError(RuntimeError):
    """The sweep cannot run as configured, or one of its steps failed; the message says which."""


@dataclass
class SweepArguments:
    """Options of ``rejalign-sweep`` (parsed by ``transformers.HfArgumentParser``).

    Options of the underlying tools pass through as ``--mix.NAME``, ``--fit.NAME`` and
    ``--eval.NAME`` (e.g. ``--fit.num_train_epochs 1``, ``--eval.seed 0``), or as ``mix:``,
    ``fit:`` and ``eval:`` sections of a YAML/JSON configuration file given first.
    """

    model: str = field(
        metadata={"help": "Base VLM: a Hub id or a folder (what `rejalign-train fit` takes)."}
    )
    output_dir: str = field(metadata={"help": "The sweep's folder (created; reruns resume it)."})
    refusal_source: str | None = field(
        default=None,
        metadata={"help": "Records whose replies become refusals (paper: LLaVA-Med)."},
    )
    total: int | None = field(
        default=None,
        metadata={
            "help": "Records in each mix: round(fraction x total) refusals (ties to even), "
            "the rest normal records."
        },
    )
    normal_source: str | None = field(
        default=None,
        metadata={"help": "Normal instruction data, kept as is (paper: LLaVA v1.5 mix665k)."},
    )
    fractions: list[str] | None = field(
        default=None,
        metadata={
            "help": "Refusal fractions in [0, 1], comma- or space-separated (default: "
            f"{','.join(DEFAULT_FRACTIONS)}; none when the configuration has arms:)."
        },
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "A sweep configuration shipped with rejalign (paper_comparison: base, "
            "VLGuard and LLaVA-Med arms); its data paths come from --set."
        },
    )
    set: list[str] | None = field(
        default=None,
        metadata={"help": "KEY=VALUE for each ${KEY} of the --recipe (or configuration file)."},
    )
    image_root: str | None = field(
        default=None,
        metadata={
            "help": "Folder the records' image paths are relative to (default: the folder of "
            "the source files, when both sit in one)."
        },
    )
    base: bool = field(
        default=True,
        metadata={
            "help": "Also evaluate the base model: the report's reference row and line. It runs "
            "before any fit, so a bad evaluation option fails early."
        },
    )
    backend: Literal["hf-multimodal", "vllm-vlm"] = field(
        default="hf-multimodal",
        metadata={
            "help": "lm-eval backend of the evaluations (the adapter is passed as peft= "
            "or lora_local_path=)."
        },
    )
    tasks: str = field(
        default=DEFAULT_TASKS,
        metadata={"help": "lm-eval tasks or groups, comma-separated (default: %(default)s)."},
    )
    limit: str | None = field(
        default=None,
        metadata={"help": "lm-eval --limit: prompts per task (smoke runs; marked in the report)."},
    )
    model_args: str | None = field(
        default=None,
        metadata={"help": "Extra lm-eval model args, e.g. dtype=bfloat16,max_model_len=4096."},
    )
    device: str | None = field(default=None, metadata={"help": "lm-eval --device (e.g. cpu)."})
    batch_size: str | None = field(default=None, metadata={"help": "lm-eval --batch_size."})
    gen_kwargs: str | None = field(
        default=None, metadata={"help": "lm-eval --gen_kwargs, e.g. max_gen_toks=512."}
    )
    metadata: str | None = field(
        default=None,
        metadata={"help": "lm-eval --metadata (JSON), e.g. the utility sets' local files."},
    )
    fit_config: str | None = field(
        default=None,
        metadata={"help": "A YAML/JSON configuration file of `rejalign-train fit`."},
    )
    fit_launcher: str | None = field(
        default=None,
        metadata={
            "help": "Command that starts fit instead of this Python, e.g. 'accelerate launch "
            "--num_processes 4' or 'torchrun --nproc_per_node 4' (it is given -m MODULE)."
        },
    )
    resume_fit: bool = field(
        default=False,
        metadata={
            "help": "Continue an interrupted fit from its last checkpoint when its inputs are "
            "unchanged, instead of redoing it from scratch."
        },
    )
    report_spec: str | None = field(
        default=None,
        metadata={"help": "A rejalign-report table spec (YAML) instead of the default."},
    )
    baseline: str | None = field(
        default=None,
        metadata={
            "help": "Row the report compares every other row with, paired per prompt "
            f"(default: {BASE_LABEL!r} when the base model is evaluated; 'none': no comparison)."
        },
    )
    judge: str | None = field(default=None, metadata={
        "help": "A model judge (rejalign-judge --help) over every evaluation's samples, as a "
        "step of its own: the report gets its columns; changing it redoes no evaluation."})
    judge_model: str | None = field(default=None, metadata={
        "help": "The judge's checkpoint, a Hub id or folder (default: the published one)."})
    judge_engine: Literal["vllm", "hf"] | None = field(default=None, metadata={
        "help": "The judge's engine (default: vllm with --backend vllm-vlm, else hf)."})
    stop_after: Literal["mix", "fit", "eval", "report"] = field(
        default="report",
        metadata={
            "help": "Last kind of step to run, e.g. fit: train every adapter now and evaluate "
            "later (or elsewhere) with a rerun."
        },
    )
    dry_run: bool = field(
        default=False, metadata={"help": "Print which steps a run would skip or redo, and stop."}
    )
    verbose: bool = field(
        default=False, metadata={"help": "Echo the steps' output (always in their log files)."}
    )


@dataclass
class SweepConfig:
    """Parsed, checked options: the dataclass plus the tools' pass-through argument lists."""

    args: SweepArguments
    passthrough: dict[str, list[str]]
    arms: list[dict] = field(default_factory=list)  # the configuration's arms: (checked shape)
    fractions: list[float] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # the trained rows: fractions, then arms
    image_root: Path | None = None
    mix_official: bool = False  # upstream's layout: the mix is written as .json
    refusal_sentence: str | None = None  # a custom single sentence of the mix, for fit
    fit_config_keys: set[str] = field(default_factory=set)
    baseline: str | None = None  # the report's row every other row is compared with

    @property
    def root(self) -> Path:
        return Path(self.args.output_dir).expanduser().resolve()


# --------------------------------------------------------------------------- values


def parse_fractions(values: Any) -> list[float]:
    """``["0,0.05", "0.1"]`` -> ``[0.0, 0.05, 0.1]``: sorted, each in [0, 1], none twice."""
    if not isinstance(values, (list, tuple)):
        values = [values]  # a single value from a configuration file: "0,0.1" or 0.1
    found: list[float] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                f = float(part)
            except ValueError:
                raise SweepError(f"--fractions: {part!r} is not a number") from None
            if not (math.isfinite(f) and 0.0 <= f <= 1.0):
                raise SweepError(f"--fractions: {part} is not a fraction in [0, 1]")
            if f in found:
                raise SweepError(f"--fractions: {part} is given twice")
            found.append(f)
    if not found:
        raise SweepError("--fractions: no fraction given")
    return sorted(found)


def fraction_label(f: float) -> str:
    """Folder and report label of a fraction: ``frac-0.10``, ``frac-0.125``, ``frac-1.00``."""
    text = f"{f:.2f}"
    return f"frac-{text if float(text) == f else repr(f)}"


def is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- pass-through


def section_argv(section: str, value: Any) -> list[str]:
    """A config file's ``fit:``/``mix:``/``eval:`` section as command-line arguments.

    A mapping gives ``--key value`` pairs (booleans as ``true``/``false`` for the
    HfArgumentParser tools, as a bare flag or nothing for lm-eval; lists as several values;
    mappings as JSON); a list is taken as arguments; a string is split like a shell would.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    if not isinstance(value, dict):
        raise SweepError(f"section {section!r}: expected a mapping of options, a list or a string")
    argv: list[str] = []
    for key, v in value.items():
        flag = f"--{key}"
        if v is None:
            continue
        if isinstance(v, bool):
            if section == "eval":
                argv += [flag] if v else []
            else:
                argv += [flag, "true" if v else "false"]
        elif isinstance(v, list):
            argv += [flag, *map(str, v)]
        elif isinstance(v, dict):
            argv += [flag, json.dumps(v)]
        else:
            argv += [flag, str(v)]
    return argv


_PASS_FLAG = re.compile(r"--(" + "|".join(SECTIONS) + r")\.(.+)")


def route_remaining(rest: list[str], passthrough: dict[str, list[str]]) -> None:
    """Move ``--fit.NAME [VALUE...]`` (and mix, eval) into the tools' argument lists.

    ``rest`` is what HfArgumentParser left over: a ``--SECTION.NAME`` flag opens that section,
    and the values after it (anything not starting with ``--``, so ``-3`` too) belong to it.
    """
    current = None
    for token in rest:
        m = _PASS_FLAG.fullmatch(token)
        if m:
            current = m.group(1)
            name, eq, value = m.group(2).partition("=")
            passthrough[current] += [f"--{name}"] + ([value] if eq else [])
        elif current is not None and not token.startswith("--"):
            passthrough[current].append(token)
        else:
            raise SweepError(
                f"unrecognised argument {token!r} (options of mix, fit and eval pass through as "
                "--mix.NAME, --fit.NAME and --eval.NAME)"
            )


def flag_names(argv: list[str]) -> list[str]:
    """Option names in an argument list: ``--lora-r 8 -t x`` -> ``["lora_r", "t"]``."""
    names = []
    for token in argv:
        if token.startswith("--"):
            names.append(token[2:].split("=", 1)[0].replace("-", "_"))
        elif re.fullmatch(r"-[A-Za-z]", token[:2]) and not is_number(token):
            names.append(token[1:2])
    return names


def check_reserved(passthrough: dict[str, list[str]]) -> None:
    """A pass-through of an option the sweep sets itself names the sweep option to use."""
    for section, argv in passthrough.items():
        for name in flag_names(argv):
            if name in RESERVED[section]:
                raise SweepError(
                    f"--{section}.{name}: the sweep sets this itself; use {RESERVED[section][name]}"
                )


# --------------------------------------------------------------------------- parsing


def parse_args(argv: list[str]) -> SweepConfig:
    """Flags, or a YAML/JSON file (first argument) whose values flags may override."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        SweepArguments,
        prog=PROG,
        description="Mix, fit and evaluate per refusal fraction, then one report (table and "
        "ASR-against-refusal-fraction figure). Reruns skip finished steps.",
        epilog="Options of the tools pass through: --mix.NAME VALUE (rejalign-train mix), "
        "--fit.NAME VALUE (rejalign-train fit), --eval.NAME VALUE (rejalign-eval / lm-eval "
        "run). A YAML/JSON file given first sets any option above, and mix:, fit: and eval: "
        "mappings of tool options; flags after it override it.",
    )
    from rejalign_train.sweep.recipes import RecipeError, load_recipe, recipe_args, substitute

    passthrough: dict[str, list[str]] = {s: [] for s in SECTIONS}
    path = config_file_arg(argv)
    recipe, sets = recipe_args(argv)
    arms: list[dict] = []
    try:
        if path is not None and recipe is not None:
            raise SweepError(
                f"{path} and --recipe {recipe}: give one (options of your own go as flags, "
                "fit's in --fit-config)"
            )
        config = None
        if path is not None:
            config = substitute(load_config_file(path), sets, str(path))
            argv = argv[1:]
        elif recipe is not None:
            config, path = load_recipe(recipe, sets), f"recipe {recipe}"
        elif sets:
            raise SweepError("--set fills in a --recipe's (or a configuration file's) ${KEY}s")
        if config is not None:
            # The tools' sections and the arms are the sweep's to route; the rest are options.
            for section in SECTIONS:
                passthrough[section] += section_argv(section, config.pop(section, None))
            arms = check_arms(config.pop("arms", None), SweepError)
            apply_config_defaults(
                parser, config, path, hint=" (tools' options go in mix:, fit: or eval: sections)"
            )
    except (UsageError, RecipeError) as exc:
        raise SweepError(str(exc)) from None
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    route_remaining(rest, passthrough)
    return SweepConfig(args, passthrough, arms)


@contextlib.contextmanager
def _argparse_errors(what: str) -> Iterator[None]:
    """argparse reports an error by printing it and exiting: turn that into a SweepError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            yield
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        raise SweepError(f"{what}: {lines[-1] if lines else 'invalid options'}") from None


def _unknown_options(parser: Any, argv: list[str], what: str) -> None:
    with _argparse_errors(f"{what} options"):
        _, unknown = parser.parse_known_args(argv)
    if unknown:
        raise SweepError(f"unknown {what} option(s): {' '.join(unknown)}")


# --------------------------------------------------------------------------- checks


def check_config(cfg: SweepConfig) -> None:
    """Everything that can be checked before the first step runs, not hours later."""
    args = cfg.args
    fractions = args.fractions
    if fractions is None:
        fractions = [] if cfg.arms else list(DEFAULT_FRACTIONS)
    cfg.fractions = parse_fractions(fractions) if fractions else []
    if args.total is not None and args.total < 1:
        raise SweepError(f"--total must be at least 1, got {args.total}")
    if cfg.fractions and (args.total is None or not args.refusal_source):
        raise SweepError("--fractions need --refusal-source and --total")
    check_reserved(cfg.passthrough)
    for option in ("refusal_source", "normal_source", "fit_config", "report_spec"):
        value = getattr(args, option)
        if value is not None and not Path(value).expanduser().is_file():
            raise SweepError(f"--{option.replace('_', '-')} {value}: file not found")
    if args.refusal_source:
        cfg.image_root = _image_root(args.image_root, (args.refusal_source, args.normal_source))
    rows = [BASE_LABEL] if args.base else []
    rows += [fraction_label(f) for f in cfg.fractions] + [arm["name"] for arm in cfg.arms]
    cfg.baseline = args.baseline or (BASE_LABEL if args.base else None)
    if cfg.baseline is not None and cfg.baseline.lower() == "none":
        cfg.baseline = None
    if cfg.baseline is not None and cfg.baseline not in rows:
        raise SweepError(f"--baseline {cfg.baseline}: not a row of this sweep ({', '.join(rows)})")
    if "," in str(cfg.root) or "," in args.model:
        raise SweepError(
            f"{cfg.root if ',' in str(cfg.root) else args.model}: lm-eval's model_args are "
            "comma-separated, so the model and output paths must not contain a comma"
        )
    if args.limit is not None and not is_number(args.limit):
        raise SweepError(f"--limit {args.limit}: not a number")
    if args.metadata is not None:
        try:
            json.loads(args.metadata)
        except ValueError as exc:
            raise SweepError(f"--metadata: not JSON ({exc})") from None
    _check_rows(cfg)
    _check_fit_options(cfg)
    from rejalign_tasks.harness.cli import lm_eval_run_parser

    run_parser = lm_eval_run_parser()
    if run_parser is not None:  # else lm-eval checks them itself when the evals start
        _unknown_options(run_parser, cfg.passthrough["eval"], "eval")


def _check_rows(cfg: SweepConfig) -> None:
    """The trained rows: one per fraction, one per arm (sources, sizes and image root)."""
    args = cfg.args
    cfg.rows = [
        Row(
            fraction_label(f),
            {"fraction": f, "total": args.total},
            args.refusal_source,
            args.normal_source,
            cfg.image_root,
            ["--refusal_fraction", repr(f), "--total", str(args.total)],
            cfg.passthrough["mix"],
        )
        for f in cfg.fractions
    ]
    for i, arm in enumerate(cfg.arms):
        where = f"arms[{i}] ({arm['name']})"
        refusal = arm.get("refusal_source", args.refusal_source)
        normal = arm.get("normal_source", args.normal_source)
        if not refusal:
            raise SweepError(f"{where}: no refusal_source (and no --refusal-source)")
        for name, value in (("refusal_source", refusal), ("normal_source", normal)):
            if value is not None and not Path(str(value)).expanduser().is_file():
                raise SweepError(f"{where}: {name} {value}: file not found")
        own = section_argv("mix", arm.get("mix"))
        for name in flag_names(own):
            if name in RESERVED["mix"]:
                raise SweepError(
                    f"{where}: mix.{name} is the arm's own field (refusal_source, "
                    "normal_source, num_refusal, num_normal, fraction, total)"
                )
        root = arm.get("image_root") or args.image_root
        sizing = arm_sizing(arm, args.total, where, SweepError)
        cfg.rows.append(
            Row(
                arm["name"],
                {"arm": arm["name"], "sizing": sizing},
                str(refusal),
                str(normal) if normal else None,
                _image_root(root, (refusal, normal), where),
                sizing,
                cfg.passthrough["mix"] + own,
                arm=True,
            )
        )
    if not cfg.rows:
        raise SweepError("nothing to train: give --fractions, or arms: in the configuration")
    for row in cfg.rows:
        where = f"arm {row.label}" if row.arm else ""
        mix_args = row_mix_args(row, cfg.root / "check.jsonl", where)
        row.official = mix_args.official
        if len(mix_args.sentences) == 1 and mix_args.sentences[0] != REFUSAL_SENTENCE:
            row.refusal_sentence = mix_args.sentences[0]
    first = cfg.rows[0]
    cfg.mix_official, cfg.refusal_sentence = first.official, first.refusal_sentence


def _check_fit_options(cfg: SweepConfig) -> None:
    """Pass-through names and values, and the fit configuration file's keys."""
    from transformers import HfArgumentParser

    from rejalign_train.config import PARSER_CLASSES

    parser = HfArgumentParser(PARSER_CLASSES, prog="rejalign-train fit")
    placeholders = ["--model", "m", "--data", "d", "--output_dir", "o"]
    _unknown_options(parser, placeholders + cfg.passthrough["fit"], "fit")
    path = cfg.args.fit_config
    if path:
        try:
            keys = set(load_config_file(Path(path).expanduser()))
        except UsageError as exc:
            raise SweepError(f"--fit-config {path}: {exc}") from exc
        bad = sorted(keys - {a.dest for a in parser._actions})
        if bad:
            raise SweepError(f"--fit-config {path}: unknown option(s) {', '.join(bad)}")
        clash = sorted(keys & set(RESERVED["fit"]))
        if clash:
            raise SweepError(f"--fit-config {path}: {', '.join(clash)} are set by the sweep")
        cfg.fit_config_keys = keys


def _image_root(given: str | None, sources: tuple, where: str = "") -> Path:
    """The folder the records' image paths are relative to: given, or the sources' one folder."""
    prefix = f"{where}: " if where else ""
    if given:
        root = Path(given).expanduser().resolve()
        if not root.is_dir():
            raise SweepError(f"{prefix}--image-root {given}: not a folder")
        return root
    folders = {Path(p).expanduser().resolve().parent for p in sources if p}
    if len(folders) > 1:
        raise SweepError(
            f"{prefix}the two sources sit in different folders: give --image-root (an arm: "
            "image_root), the folder their records' image paths are relative to"
        )
    return folders.pop()


def row_mix_args(row: Row, output: Path, where: str = "") -> Any:
    """The ``rejalign-train mix`` options of one row's mix (checked by its own parser)."""
    from rejalign_train.mixing import MixError, parse_args

    what = f"{where}: mix options" if where else "mix options"
    try:
        with _argparse_errors(what):
            return parse_args(row_mix_argv(row, output))
    except MixError as exc:
        raise SweepError(f"{what}: {exc}") from exc
