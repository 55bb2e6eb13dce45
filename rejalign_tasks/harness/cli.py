"""``rejalign-eval``: the paper's whole table for one model (+ adapter) in one run, one folder.

It is lm-eval's own command line (every ``lm_eval run`` option works and means the same), with:

* text-only and image tasks answered together by the same VLM (see :mod:`.routing`);
  the backend stays a pass-through, so ``--model hf-multimodal`` and ``--model vllm-vlm`` (with
  their own ``peft=`` / ``lora_local_path=`` model args) both work, and so does ``--model vllm``
  (its image tasks take vllm-vlm's path on the same engine, see :mod:`.vllm_images`);
* defaults suited to VLM evaluation: ``--tasks rejalign_paper``, ``--model hf-multimodal``,
  ``--apply_chat_template`` (opt out with ``--no_chat_template``) and ``--log_samples``;
* ``--output_path`` required: the run leaves ``OUT/<model>/results_<ts>.json`` (lm-eval's schema,
  groups included) and one ``samples_<task>_<ts>.jsonl`` per task, side by side;
* ``--judge NAME`` (with ``--judge-model``, ``--judge-engine``): a model judge over the run's
  sample logs once lm-eval is done (``rejalign-judge``, see :mod:`rejalign_tasks.judge`), in a
  process of its own so that the evaluated model's memory is free before the judge loads.

Why one run rather than one run per modality: the model is loaded once, every answer comes from
the same object, and lm-eval computes the groups (``rejalign_paper`` mixes both kinds) itself.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from rejalign_tasks.console import CommandFailed, UsageError, run_command

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "hf-multimodal"
DEFAULT_TASKS = "rejalign_paper"
NO_CHAT_TEMPLATE = "--no_chat_template"
SUBCOMMANDS = ("run", "ls", "validate")
HELP = f"""rejalign-eval: lm-eval's `run` command for the paper's table, one run, one folder.
  Text-only and image tasks share the run, answered by the same VLM (+ adapter).
  Defaults: --model {DEFAULT_MODEL} --tasks {DEFAULT_TASKS} --apply_chat_template --log_samples
  {NO_CHAT_TEMPLATE}   do not apply the model's chat template
  --judge NAME          then judge the samples with a model judge (rejalign-judge --help)
  --judge-model ID|DIR  the judge's checkpoint (default: the judge's published one)
  --judge-engine vllm|hf  default: vllm with --model vllm/vllm-vlm, else hf (on --device)
  --output_path is required. lm-eval's options follow.
"""


def _has(argv: Sequence[str], *flags: str) -> bool:
    return any(a in flags or any(a.startswith(f + "=") for f in flags) for a in argv)


def _value(argv: Sequence[str], *flags: str) -> str | None:
    for i, a in enumerate(argv):
        for f in flags:
            if a == f and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(f + "="):
                return a[len(f) + 1 :]
    return None


JUDGE_FLAGS = ("--judge", "--judge-model", "--judge-engine")


def split_judge_options(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` without the ``--judge*`` options, and those options (flag -> value)."""
    rest: list[str] = []
    found: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        flag = next((f for f in JUDGE_FLAGS if a == f or a.startswith(f + "=")), None)
        if flag is None:
            rest.append(a)
        elif a == flag:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UsageError(f"{flag} needs a value")
            found[flag] = args[i + 1]
            i += 1
        else:
            found[flag] = a[len(flag) + 1 :]
        i += 1
    if found and "--judge" not in found:
        raise UsageError(f"{', '.join(found)} given without --judge NAME")
    return rest, found


def judge_command(judge: dict[str, str], lm_args: Sequence[str], run_dir: Path) -> list[str]:
    """The ``rejalign-judge`` command for this run's folder (same interpreter)."""
    from rejalign_tasks.judge.judges import JUDGES

    name = judge["--judge"]
    if name not in JUDGES:
        raise UsageError(f"--judge {name}: expected one of {', '.join(JUDGES)}")
    model = _value(lm_args, "--model", "-M") or DEFAULT_MODEL
    engine = judge.get("--judge-engine") or ("vllm" if model.startswith("vllm") else "hf")
    if engine not in ("vllm", "hf"):
        raise UsageError(f"--judge-engine {engine}: expected vllm or hf")
    cmd = [sys.executable, "-m", "rejalign_tasks.judge", str(run_dir), "--judge", name]
    cmd += ["--engine", engine]
    if judge.get("--judge-model"):
        cmd += ["--judge-model", judge["--judge-model"]]
    device = _value(lm_args, "--device")
    if engine == "hf" and device:
        cmd += ["--device", device]
    return cmd


def build_argv(argv: Sequence[str]) -> list[str]:
    """lm-eval ``run`` arguments for a ``rejalign-eval`` command line (defaults filled in)."""
    args = list(argv)
    if args and args[0] in SUBCOMMANDS:
        if args[0] != "run":
            return args  # `rejalign-eval ls tasks` etc. go to lm-eval untouched
        args = args[1:]
    if any(a in ("-h", "--help") for a in args):
        return ["run", *args]
    chat = NO_CHAT_TEMPLATE not in args
    args = [a for a in args if a != NO_CHAT_TEMPLATE]
    from_config = _has(args, "--config", "-C")
    if not from_config and not _has(args, "--model", "-M"):
        args += ["--model", DEFAULT_MODEL]
    if not from_config and not _has(args, "--tasks", "-t"):
        args += ["--tasks", DEFAULT_TASKS]
    if chat and not _has(args, "--apply_chat_template"):
        args.append("--apply_chat_template")
    if not _has(args, "--log_samples", "-s", "--predict_only", "-x"):
        args.append("--log_samples")
    if not from_config and not _has(args, "--output_path", "-o"):
        raise UsageError(
            "--output_path is required (the folder that will hold the results JSON and every "
            "task's samples)"
        )
    return ["run", *args]


def lm_eval_run_parser() -> argparse.ArgumentParser | None:
    """lm-eval's own ``run`` option parser, so a sweep can check eval options before hours of
    training; ``None`` (with one warning) when lm-eval's CLI no longer has that shape."""
    try:
        from lm_eval._cli import HarnessCLI

        parser = HarnessCLI()._subparsers.choices["run"]
    except Exception as exc:  # lm-eval's private CLI layout moved
        logger.warning("rejalign: lm-eval's run parser not found (%r); eval options are "
                       "checked by lm-eval when the run starts", exc)
        return None
    return parser if isinstance(parser, argparse.ArgumentParser) else None


def _evaluate(argv: list[str]) -> int:
    from lm_eval.__main__ import cli_evaluate

    from rejalign_tasks.harness.routing import install

    argv, judge = split_judge_options(argv)
    lm_args = build_argv(argv)
    if lm_args[:1] == ["run"] and any(a in ("-h", "--help") for a in lm_args):
        print(HELP)
    elif judge and lm_args[:1] != ["run"]:
        raise UsageError("--judge applies to an evaluation run, not to `ls`/`validate`")
    if judge:
        judge_command(judge, lm_args, Path("."))  # bad judge options fail before the run
    install()
    saved = sys.argv
    sys.argv = ["rejalign-eval", *lm_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    out = _value(lm_args, "--output_path", "-o")
    if out and lm_args[:1] == ["run"]:
        results = sorted(Path(out).expanduser().glob("**/results_*.json"), key=_mtime)
        if results:
            print(f"rejalign-eval: results and samples in {results[-1].parent}")
            if judge:
                cmd = judge_command(judge, lm_args, results[-1].parent)
                shown = " ".join(["rejalign-judge", *cmd[3:]])
                print(f"rejalign-eval: judging with {judge['--judge']}: {shown}")
                if subprocess.run(cmd).returncode != 0:
                    raise CommandFailed(
                        f"the {judge['--judge']} judge failed (the evaluation's results are "
                        f"kept in {results[-1].parent}; rerun `{shown}` to judge)"
                    )
        elif judge:
            raise CommandFailed(f"--judge: no results_*.json under {out} to judge")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``rejalign-eval``): rejalign's CLI convention (0 done, 1 the run
    failed, 2 bad options, 130 interrupted) around lm-eval's own command line."""
    return run_command(
        "rejalign-eval",
        _evaluate,
        argv,
        failures=(RuntimeError,),
        interrupted="interrupted; the results of this run were not written",
    )


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
