"""``rejalign-sweep``: the paper's central figure in one command.

For each refusal fraction the sweep mixes the training data (``rejalign-train mix``), fine-tunes
the model on it (``rejalign-train fit``) and evaluates the adapter (``rejalign-eval``); the base
model is evaluated once as the reference; then ``rejalign-report`` draws the table and the
figures over all of them. Every step has its own folder::

    OUT/sweep.json                     the configuration of the latest run
    OUT/frac-0.10/mix/                 mixed.jsonl + mixed.manifest.json
    OUT/frac-0.10/fit/adapter/         the LoRA adapter and its rejalign_manifest.json
    OUT/frac-0.10/eval/results/        lm-eval's results_*.json and samples_*.jsonl
    OUT/base/eval/results/             the base model, evaluated on the same tasks
    OUT/report/                        report.md, table_*.csv, cells.csv, figures

Why steps and markers: a sweep takes hours to days, and it gets interrupted. A step is finished
only when its folder holds ``rejalign_step.json``, written atomically as the step's last act; the
marker records the step's inputs (options, source-file and upstream-output digests) and the
digests of what it wrote. A rerun skips a step whose marker matches the inputs it would run with
and whose outputs are still the ones recorded, and redoes any other step from an empty folder.
Downstream inputs include the upstream outputs' digest, so a changed option redoes exactly the
steps it affects (a new fit option: every fit, eval and the report; a new ``--limit``: the evals
and the report) and never reuses stale results.

Each fit and eval runs as a subprocess (the model is loaded in a fresh process, ``--fit-launcher``
can be ``accelerate launch`` or ``torchrun``), with its output in the step's log file. A child
process is terminated when the sweep dies, even by SIGKILL, so a killed sweep leaves no orphan
training behind.
"""

# No ``from __future__ import annotations`` here: ``HfArgumentParser`` reads the field types at
# run time.
import contextlib
import ctypes
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rejalign_tasks.contracts import REFUSAL_SENTENCE, sha256_file
from rejalign_train.manifest import library_versions, utc_now, write_json_atomic

logger = logging.getLogger("rejalign_train.sweep")

STEP_MARKER = "rejalign_step.json"
STEP_STARTED = "rejalign_step.started.json"
STEP_FORMAT = "rejalign-sweep-step/1"
CONFIG_NAME = "sweep.json"
LOCK_NAME = ".rejalign-sweep.lock"
BASE_LABEL = "base"
REPORT_DIR = "report"
ADAPTER_DIR = "adapter"
RESULTS_DIR = "results"
DEFAULT_FRACTIONS = ("0", "0.05", "0.1", "0.2")
# FigStep (safety), XSTest (over-refusal) and the utility pair: the paper's columns that need no
# data beyond what rejalign pins or fetches. MM-SafetyBench SD+TYPO needs Stable Diffusion
# images the user must supply, so it is opt-in (--tasks rejalign_paper adds it).
DEFAULT_TASKS = "rejalign_figstep,rejalign_xstest,rejalign_utility"
SECTIONS = ("mix", "fit", "eval")
BACKEND_ADAPTER_ARG = {"hf-multimodal": "peft", "vllm-vlm": "lora_local_path"}

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
    refusal_source: str = field(
        metadata={"help": "Records whose replies become refusals (paper: LLaVA-Med)."}
    )
    output_dir: str = field(metadata={"help": "The sweep's folder (created; reruns resume it)."})
    total: int = field(
        metadata={
            "help": "Records in each mix: round(fraction x total) refusals (ties to even), "
            "the rest normal records."
        }
    )
    normal_source: str | None = field(
        default=None,
        metadata={"help": "Normal instruction data, kept as is (paper: LLaVA v1.5 mix665k)."},
    )
    fractions: list[str] = field(
        default_factory=lambda: list(DEFAULT_FRACTIONS),
        metadata={"help": "Refusal fractions in [0, 1], comma- or space-separated."},
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


# --------------------------------------------------------------------------- configuration


@dataclass
class SweepConfig:
    """Parsed, checked options: the dataclass plus the tools' pass-through argument lists."""

    args: SweepArguments
    passthrough: dict[str, list[str]]
    fractions: list[float] = field(default_factory=list)
    image_root: Path | None = None
    mix_official: bool = False  # upstream's layout: the mix is written as .json
    refusal_sentence: str | None = None  # a custom single sentence of the mix, for fit
    fit_config_keys: set[str] = field(default_factory=set)
    baseline: str | None = None  # the report's row every other row is compared with

    @property
    def root(self) -> Path:
        return Path(self.args.output_dir).expanduser().resolve()


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


def _section_argv(section: str, value: Any) -> list[str]:
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
    """Move ``--fit.NAME [VALUE...]`` (and mix, eval) into the tools' argument lists."""
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


def _flag_names(argv: list[str]) -> list[str]:
    """Option names in an argument list: ``--lora-r 8 -t x`` -> ``["lora_r", "t"]``."""
    names = []
    for token in argv:
        if token.startswith("--"):
            names.append(token[2:].split("=", 1)[0].replace("-", "_"))
        elif re.fullmatch(r"-[A-Za-z]", token[:2]) and not _is_number(token):
            names.append(token[1:2])
    return names


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def check_reserved(passthrough: dict[str, list[str]]) -> None:
    for section, argv in passthrough.items():
        for name in _flag_names(argv):
            if name in RESERVED[section]:
                raise SweepError(
                    f"--{section}.{name}: the sweep sets this itself; use {RESERVED[section][name]}"
                )


def _config_file(argv: list[str]) -> Path | None:
    if argv and not argv[0].startswith("-"):
        path = Path(argv[0])
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            return path
    return None


def parse_args(argv: list[str]) -> SweepConfig:
    """Flags, or a YAML/JSON file (first argument) whose values flags may override."""
    from transformers import HfArgumentParser

    from rejalign_train.config import load_config_file

    parser = HfArgumentParser(
        SweepArguments,
        prog="rejalign-sweep",
        description="Mix, fit and evaluate per refusal fraction, then one report (table and "
        "ASR-against-refusal-fraction figure). Reruns skip finished steps.",
        epilog="Options of the tools pass through: --mix.NAME VALUE (rejalign-train mix), "
        "--fit.NAME VALUE (rejalign-train fit), --eval.NAME VALUE (rejalign-eval / lm-eval "
        "run). A YAML/JSON file given first sets any option above, and mix:, fit: and eval: "
        "mappings of tool options; flags after it override it.",
    )
    passthrough: dict[str, list[str]] = {s: [] for s in SECTIONS}
    path = _config_file(argv)
    if path is not None:
        try:
            config = load_config_file(path)
        except (OSError, ValueError) as exc:
            raise SweepError(f"{path}: cannot read the configuration ({exc})") from exc
        for section in SECTIONS:
            passthrough[section] += _section_argv(section, config.pop(section, None))
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise SweepError(
                f"{path}: unknown option(s) {', '.join(unknown)} (tools' options go in "
                "mix:, fit: or eval: sections)"
            )
        for action in parser._actions:
            if action.dest in config:
                action.default = config[action.dest]
                action.required = False
        argv = argv[1:]
    args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    route_remaining(rest, passthrough)
    return SweepConfig(args, passthrough)


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


def _unknown_options(parser, argv: list[str], what: str) -> None:
    with _argparse_errors(f"{what} options"):
        _, unknown = parser.parse_known_args(argv)
    if unknown:
        raise SweepError(f"unknown {what} option(s): {' '.join(unknown)}")


def check_config(cfg: SweepConfig) -> None:
    """Everything that can be checked before the first step runs, not hours later."""
    args = cfg.args
    cfg.fractions = parse_fractions(args.fractions)
    if args.total < 1:
        raise SweepError(f"--total must be at least 1, got {args.total}")
    check_reserved(cfg.passthrough)
    for option in ("refusal_source", "normal_source", "fit_config", "report_spec"):
        value = getattr(args, option)
        if value is not None and not Path(value).expanduser().is_file():
            raise SweepError(f"--{option.replace('_', '-')} {value}: file not found")
    cfg.image_root = _image_root(args)
    rows = ([BASE_LABEL] if args.base else []) + [fraction_label(f) for f in cfg.fractions]
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
    if args.limit is not None and not _is_number(args.limit):
        raise SweepError(f"--limit {args.limit}: not a number")
    if args.metadata is not None:
        try:
            json.loads(args.metadata)
        except ValueError as exc:
            raise SweepError(f"--metadata: not JSON ({exc})") from None
    _check_mix_options(cfg)
    _check_fit_options(cfg)
    from lm_eval._cli import HarnessCLI

    _unknown_options(HarnessCLI()._subparsers.choices["run"], cfg.passthrough["eval"], "eval")


def _check_mix_options(cfg: SweepConfig) -> None:
    """Each fraction's mix options through mix's own parser; what fit must know of them."""

    for f in cfg.fractions:
        mix_args = mix_arguments(cfg, f, cfg.root / "check.jsonl")
    cfg.mix_official = mix_args.official
    if len(mix_args.sentences) == 1 and mix_args.sentences[0] != REFUSAL_SENTENCE:
        cfg.refusal_sentence = mix_args.sentences[0]


def _check_fit_options(cfg: SweepConfig) -> None:
    """Pass-through names and values, and the fit configuration file's keys."""
    from transformers import HfArgumentParser

    from rejalign_train.config import PARSER_CLASSES, load_config_file

    parser = HfArgumentParser(PARSER_CLASSES, prog="rejalign-train fit")
    placeholders = ["--model", "m", "--data", "d", "--output_dir", "o"]
    _unknown_options(parser, placeholders + cfg.passthrough["fit"], "fit")
    path = cfg.args.fit_config
    if path:
        try:
            keys = set(load_config_file(Path(path).expanduser()))
        except (OSError, ValueError) as exc:
            raise SweepError(f"--fit-config {path}: {exc}") from exc
        bad = sorted(keys - {a.dest for a in parser._actions})
        if bad:
            raise SweepError(f"--fit-config {path}: unknown option(s) {', '.join(bad)}")
        clash = sorted(keys & set(RESERVED["fit"]))
        if clash:
            raise SweepError(f"--fit-config {path}: {', '.join(clash)} are set by the sweep")
        cfg.fit_config_keys = keys


def _image_root(args: SweepArguments) -> Path:
    if args.image_root:
        root = Path(args.image_root).expanduser().resolve()
        if not root.is_dir():
            raise SweepError(f"--image-root {args.image_root}: not a folder")
        return root
    folders = {
        Path(p).expanduser().resolve().parent
        for p in (args.refusal_source, args.normal_source)
        if p
    }
    if len(folders) > 1:
        raise SweepError(
            "the two sources sit in different folders: give --image-root, the folder their "
            "records' image paths are relative to"
        )
    return folders.pop()


def mix_arguments(cfg: SweepConfig, fraction: float, output: Path):
    """The ``rejalign-train mix`` options of one fraction's mix (checked by its own parser)."""
    from rejalign_train.mixing import MixError, parse_args

    argv = ["--refusal_source", str(Path(cfg.args.refusal_source).expanduser())]
    if cfg.args.normal_source:
        argv += ["--normal_source", str(Path(cfg.args.normal_source).expanduser())]
    argv += ["--refusal_fraction", repr(fraction), "--total", str(cfg.args.total)]
    argv += ["--output", str(output), *cfg.passthrough["mix"]]
    try:
        with _argparse_errors("mix options"):
            return parse_args(argv)
    except MixError as exc:
        raise SweepError(f"mix options: {exc}") from exc


# --------------------------------------------------------------------------- step markers


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / STEP_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == STEP_FORMAT else None


def step_status(folder: Path, inputs: dict) -> tuple[dict | None, str]:
    """(the marker, when the step is finished with these inputs and intact outputs; why not)."""
    if not folder.exists():
        return None, "not run yet"
    marker = read_marker(folder)
    if marker is None:
        if (folder / STEP_MARKER).exists():
            return None, f"unreadable {STEP_MARKER}"
        return None, f"unfinished (no {STEP_MARKER})"
    if marker.get("key") != digest(inputs):
        before = marker.get("inputs") or {}
        changed = sorted(
            k
            for k in {*before, *inputs}
            if k not in before or k not in inputs or before[k] != inputs[k]
        )
        return None, f"inputs changed ({', '.join(changed) or 'format'})"
    for name, expected in (marker.get("outputs") or {}).items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != expected:
            return None, f"output {name} changed or missing since the step finished"
    return marker, "finished"


def output_digests(folder: Path, paths: list[Path]) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(paths)}


# --------------------------------------------------------------------------- subprocesses


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when the sweep dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os._exit(1)


def run_logged(cmd: list[str], log: Path, echo: bool, what: str) -> None:
    """Run ``cmd`` with its output in ``log`` (and on stdout with ``echo``); fail loudly."""
    env = {**os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    with open(log, "wb") as out:
        out.write(f"$ {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec
        )
        try:
            for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                out.write(chunk)
                out.flush()
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        raise SweepError(
            f"{what} failed (exit status {code}); the end of {log}:\n  " + "\n  ".join(tail)
        )


@contextlib.contextmanager
def sweep_lock(root: Path) -> Iterator[None]:
    """One sweep at a time per folder (the lock dies with the process, even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_NAME, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"{root}: another rejalign-sweep is running on this folder") from None
        yield


def _file_key(value: str) -> str | dict:
    """A pass-through value; one naming a file stands for the file's content too."""
    path = Path(value).expanduser()
    if path.is_file():
        return {"file": value, "sha256": sha256_file(path)}
    return value


def _argv_key(argv: list[str]) -> list:
    return [_file_key(a) if not a.startswith("-") else a for a in argv]


# --------------------------------------------------------------------------- the sweep


@dataclass
class StepRecord:
    name: str
    state: str  # "skipped" | "ran" | "todo" | "after"
    reason: str


class Sweep:
    """Runs (or, dry, plans) the steps in order: mixes, base eval, fit+eval per fraction, report.

    The mixes come first (cheap, and they check every record of the sources), then the base
    model's evaluation (it checks the evaluation options and data), before hours of training.
    """

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self.args = cfg.args
        self.root = cfg.root
        self.dry_run = cfg.args.dry_run
        self.records: list[StepRecord] = []
        self._sources: dict[str, Any] | None = None

    # -- bookkeeping

    def _log(self, name: str, message: str) -> None:
        logger.info("%s: %s", name, message)

    def sources_key(self) -> dict[str, Any]:
        if self._sources is None:
            self._sources = {
                "refusal_source": sha256_file(Path(self.args.refusal_source).expanduser()),
                "normal_source": (
                    sha256_file(Path(self.args.normal_source).expanduser())
                    if self.args.normal_source
                    else None
                ),
            }
        return self._sources

    def step(
        self,
        name: str,
        folder: Path,
        inputs: dict | None,
        execute: Callable[[Path, bool], list[Path]],
        resumable: Callable[[Path], bool] | None = None,
    ) -> str | None:
        """Skip or run one step; return its outputs' digest (None: not known in a dry run)."""
        if inputs is None:
            self.records.append(StepRecord(name, "after", "its input step runs first"))
            self._log(name, "to run (after the step it depends on)")
            return None
        marker, reason = step_status(folder, inputs)
        if marker is not None:
            self.records.append(StepRecord(name, "skipped", reason))
            self._log(name, f"finished {marker.get('finished')}, skipping")
            return marker["outputs_digest"]
        resume = False
        if resumable is not None and folder.exists() and read_marker(folder) is None:
            started = _read_json(folder / STEP_STARTED)
            resume = bool(started and started.get("key") == digest(inputs) and resumable(folder))
        if self.dry_run:
            self.records.append(StepRecord(name, "todo", reason))
            self._log(name, f"to run ({reason}{'; would resume' if resume else ''})")
            return None
        self._log(name, f"running ({reason}{'; resuming its checkpoint' if resume else ''})")
        if not resume:
            (folder / STEP_MARKER).unlink(missing_ok=True)  # never a marker beside partial work
            if folder.exists():
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        key = digest(inputs)
        started = utc_now()
        write_json_atomic(folder / STEP_STARTED, {"key": key, "started": started})
        t0 = time.perf_counter()
        outputs = output_digests(folder, execute(folder, resume))
        marker = {
            "format": STEP_FORMAT,
            "step": name,
            "key": key,
            "inputs": inputs,
            "outputs": outputs,
            "outputs_digest": digest(outputs),
            "started": started,
            "finished": utc_now(),
            "seconds": round(time.perf_counter() - t0, 3),
            "resumed": resume,
            "versions": library_versions(),
        }
        write_json_atomic(folder / STEP_MARKER, marker)  # last: the step is now finished
        self.records.append(StepRecord(name, "ran", reason))
        self._log(name, f"finished in {marker['seconds']:.1f} s")
        return marker["outputs_digest"]

    # -- the steps

    def mix_data(self, label: str) -> Path:
        """The mix's data file (``.json`` in upstream's --official layout, else JSON Lines)."""
        name = "mixed.json" if self.cfg.mix_official else "mixed.jsonl"
        return self.root / label / "mix" / name

    def mix_step(self, fraction: float) -> str | None:
        label = fraction_label(fraction)
        folder = self.root / label / "mix"
        data = self.mix_data(label)
        inputs = {
            "fraction": fraction,
            "total": self.args.total,
            **self.sources_key(),
            "mix_args": _argv_key(self.cfg.passthrough["mix"]),
        }

        def execute(folder: Path, resume: bool) -> list[Path]:
            from rejalign_train.mixing import MixError, manifest_path, mix, write_mix
            from rejalign_train.records import RecordError

            try:
                args = mix_arguments(self.cfg, fraction, data)
                write_mix(args, mix(args))
            except (MixError, RecordError) as exc:
                raise SweepError(f"{label}/mix: {exc}") from exc
            return [data, manifest_path(data)]

        return self.step(f"{label}/mix", folder, inputs, execute)

    def fit_command(self, data: Path, adapter: Path) -> list[str]:
        """``rejalign-train fit`` on one mix, started by ``--fit-launcher`` or this Python."""
        launcher = shlex.split(self.args.fit_launcher or "") or [sys.executable]
        cmd = [*launcher, "-m", "rejalign_train.cli", "fit"]
        if self.args.fit_config:  # fit reads a configuration file only as its first argument
            cmd.append(str(Path(self.args.fit_config).expanduser().resolve()))
        cmd += ["--model", self.args.model, "--data", str(data)]
        cmd += ["--image_root", str(self.cfg.image_root), "--output_dir", str(adapter)]
        cmd += self.cfg.passthrough["fit"]
        given = set(_flag_names(self.cfg.passthrough["fit"])) | self.cfg.fit_config_keys
        if self.cfg.refusal_sentence and "refusal_sentence" not in given:
            # The mix's custom sentence is the one fit must recognise ("train without EOS").
            cmd += ["--refusal_sentence", self.cfg.refusal_sentence]
        return cmd

    def eval_command(self, adapter: Path | None, results: Path) -> list[str]:
        """``rejalign-eval`` of the base model, or of it with ``adapter``, into ``results``."""
        model_args = f"pretrained={self.args.model}"
        if adapter is not None:
            model_args += f",{BACKEND_ADAPTER_ARG[self.args.backend]}={adapter}"
        if self.args.model_args:
            model_args += f",{self.args.model_args}"
        cmd = [sys.executable, "-m", "rejalign_tasks.harness.cli", "--model", self.args.backend]
        cmd += ["--model_args", model_args, "--tasks", self.args.tasks]
        cmd += ["--output_path", str(results)]
        for option in ("device", "batch_size", "limit", "gen_kwargs", "metadata"):
            value = getattr(self.args, option)
            if value is not None:
                cmd += [f"--{option}", value]
        return cmd + self.cfg.passthrough["eval"]

    def fit_step(self, fraction: float, mix_digest: str | None) -> str | None:
        label = fraction_label(fraction)
        folder = self.root / label / "fit"
        data = self.mix_data(label)
        inputs = None
        if mix_digest is not None:
            inputs = {
                "model": _model_key(self.args.model),
                "mix": mix_digest,
                "image_root": str(self.cfg.image_root),
                "fit_config": _file_key(self.args.fit_config) if self.args.fit_config else None,
                "fit_args": _argv_key(self.cfg.passthrough["fit"]),
                "fit_launcher": self.args.fit_launcher,
                "refusal_sentence": self.cfg.refusal_sentence,
            }

        def execute(folder: Path, resume: bool) -> list[Path]:
            cmd = self.fit_command(data, folder / ADAPTER_DIR)
            if resume:  # fit --resume skips (and removes) a checkpoint a kill cut short
                cmd.append("--resume")
            run_logged(cmd, folder / "fit.log", self.args.verbose, f"{label}/fit")
            from rejalign_train.manifest import is_finished

            adapter = folder / ADAPTER_DIR
            if not is_finished(adapter):
                raise SweepError(f"{label}/fit: {adapter} holds no finished adapter")
            return [p for p in adapter.iterdir() if p.is_file()]

        def resumable(folder: Path) -> bool:
            from rejalign_train.fit import incomplete_dir, trainer_checkpoints

            work = incomplete_dir(folder / ADAPTER_DIR)
            return self.args.resume_fit and bool(trainer_checkpoints(work)[0])

        return self.step(f"{label}/fit", folder, inputs, execute, resumable)

    def eval_step(self, label: str, fit_digest: str | None, adapter: Path | None) -> str | None:
        folder = self.root / label / "eval"
        inputs = None
        if adapter is None or fit_digest is not None:
            inputs = {
                "model": _model_key(self.args.model),
                "adapter": fit_digest,
                **{
                    k: getattr(self.args, k)
                    for k in (
                        "backend",
                        "tasks",
                        "limit",
                        "model_args",
                        "device",
                        "batch_size",
                        "gen_kwargs",
                        "metadata",
                    )
                },
                "eval_args": _argv_key(self.cfg.passthrough["eval"]),
            }

        def execute(folder: Path, resume: bool) -> list[Path]:
            cmd = self.eval_command(adapter, folder / RESULTS_DIR)
            run_logged(cmd, folder / "eval.log", self.args.verbose, f"{label}/eval")
            results = sorted((folder / RESULTS_DIR).rglob("results_*.json"))
            if len(results) != 1:
                raise SweepError(
                    f"{label}/eval: expected one results_*.json under {folder / RESULTS_DIR}, "
                    f"found {len(results)}"
                )
            return results + sorted(results[0].parent.glob("samples_*.jsonl"))

        return self.step(f"{label}/eval", folder, inputs, execute)

    def report_step(self, evals: dict[str, str | None]) -> str | None:
        folder = self.root / REPORT_DIR
        baseline = self.cfg.baseline
        inputs = None
        if all(d is not None for d in evals.values()):
            inputs = {
                "evals": evals,
                "baseline": baseline,
                "report_spec": _file_key(self.args.report_spec) if self.args.report_spec else None,
            }

        def execute(folder: Path, resume: bool) -> list[Path]:
            from rejalign_tasks.report.logs import ReportInputError
            from rejalign_tasks.report.report import make_report
            from rejalign_tasks.report.spec import SpecError, load_spec

            runs = [f"{label}={self.root / label / 'eval' / RESULTS_DIR}" for label in evals]
            try:
                spec = load_spec(self.args.report_spec) if self.args.report_spec else None
                return make_report(runs, folder, spec=spec, baseline=baseline)
            except (ReportInputError, SpecError) as exc:
                raise SweepError(f"report: {exc}") from exc

        return self.step(REPORT_DIR, folder, inputs, execute)

    # -- the whole

    def run(self) -> list[StepRecord]:
        if not self.dry_run:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                self.root / CONFIG_NAME,
                {
                    "arguments": dataclasses.asdict(self.args),
                    "fractions": self.cfg.fractions,
                    "passthrough": self.cfg.passthrough,
                    "image_root": str(self.cfg.image_root),
                    "written": utc_now(),
                },
            )
        last = ("mix", "fit", "eval", "report").index(self.args.stop_after)
        mixes = {f: self.mix_step(f) for f in self.cfg.fractions}
        evals: dict[str, str | None] = {}
        if self.args.base and last >= 2:
            evals[BASE_LABEL] = self.eval_step(BASE_LABEL, None, None)
        for f in self.cfg.fractions if last >= 1 else ():
            label = fraction_label(f)
            fit_digest = self.fit_step(f, mixes[f])
            if last >= 2:
                adapter = self.root / label / "fit" / ADAPTER_DIR
                evals[label] = self.eval_step(label, fit_digest, adapter)
        if last >= 3:
            self.report_step(evals)
        return self.records


def _model_key(model: str) -> str:
    """A local model by its absolute path (so the working folder does not matter), else the id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s rejalign-sweep %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """``rejalign-sweep [CONFIG.yaml] [--options]``: 0 done, 1 a step failed, 2 bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        cfg = parse_args(argv)
        check_config(cfg)
    except SweepError as exc:
        print(f"rejalign-sweep: error: {exc}", file=sys.stderr)
        return 2
    try:
        with sweep_lock(cfg.root) if not cfg.args.dry_run else _nothing():
            records = Sweep(cfg).run()
    except SweepError as exc:
        print(f"rejalign-sweep: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rejalign-sweep: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    ran = sum(r.state == "ran" for r in records)
    skipped = sum(r.state == "skipped" for r in records)
    if cfg.args.dry_run:
        todo = len(records) - skipped
        print(f"rejalign-sweep: dry run: {todo} step(s) to run, {skipped} finished")
    else:
        done = f"rejalign-sweep: {ran} step(s) run, {skipped} skipped"
        if cfg.args.stop_after == "report":
            done += f"; report: {cfg.root / REPORT_DIR / 'report.md'}"
        else:
            done += f"; stopped after the {cfg.args.stop_after} steps (--stop-after)"
        print(done)
    return 0


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    sys.exit(main())
