"""``rejalign-judge``: model judges as a second stage over lm-eval output folders.

``rejalign-judge RUN_DIR... --judge NAME --judge-model HUB_ID_OR_DIR [--engine vllm|hf]`` judges
every safety task's logged samples (``lm_eval --log_samples`` / ``rejalign-eval`` output) and
writes, beside them, a judged copy of each samples file and ``judged_<judge>_<ts>.json`` with
the judged metrics, which ``rejalign-report`` shows as extra columns (see :mod:`.run`).
Follows :mod:`rejalign_tasks.console`'s convention (exit 0/1/2/130, a leading YAML/JSON
configuration file). Import-light: ``--help`` loads no model library.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

from rejalign_tasks.console import UsageError, run_command, split_config
from rejalign_tasks.judge.judges import JUDGES

PROG = "rejalign-judge"


def build_parser() -> argparse.ArgumentParser:
    judges = "\n".join(
        textwrap.fill(spec.summary, 88, initial_indent=f"  {name:<22} ", subsequent_indent=" " * 25)
        for name, spec in JUDGES.items()
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Judge lm-eval sample logs (samples_<task>_<ts>.jsonl, written with\n"
        "--log_samples) with a model judge; write a judged copy of each samples file and the\n"
        "judged metrics (asr_<judge>, ...) beside them, for rejalign-report. Resumable: a\n"
        "killed run continues, a finished one is skipped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"judges (--judge):\n{judges}\n\n"
        "Vision judges (llama-guard-3-vision, llama-guard-4) see the attack image, rebuilt\n"
        "from the logged document by the task's own doc_to_image and checked against the image\n"
        "hash lm-eval logged. Llama Guard 3 Vision runs with --engine hf only: it is an Mllama\n"
        "model, and vLLM removed Mllama after 0.10.2. Utility tasks are not judged. The judge\n"
        "model is a Hub id or a local folder; nothing is sent anywhere else.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="lm-eval --output_path folders"
    )
    parser.add_argument("--judge", required=True, choices=list(JUDGES), metavar="NAME",
                        help=f"the judge: {', '.join(JUDGES)}")
    parser.add_argument(
        "--judge-model",
        metavar="HUB_ID_OR_DIR",
        help="the judge checkpoint (default: the judge's published one)",
    )
    parser.add_argument("--judge-variant", metavar="NAME",
                        help="a judge's alternative prompt (harmbench: llama2, mistral)")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm",
                        help="vllm (every prompt of a chunk in one call) or hf (transformers); "
                        "default %(default)s")
    parser.add_argument("--adapter", metavar="HUB_ID_OR_DIR",
                        help="LoRA adapter replacing the judge's published one (strongreject)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="hf engine: prompts per generate call (default %(default)s)")
    parser.add_argument("--device", default="cpu",
                        help="hf engine: torch device (default %(default)s; vLLM picks its own)")
    parser.add_argument("--dtype", default="auto",
                        help="model dtype: auto, float32, bfloat16, ... (default %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=512,
                        help="samples judged between checkpoints (default %(default)s)")
    parser.add_argument("--vllm-args", metavar="JSON", default="{}",
                        help='extra vllm.LLM arguments as JSON, e.g. \'{"enforce_eager": true}\'')
    return parser


def _run(argv: list[str]) -> int:
    parser = build_parser()
    argv, _ = split_config(parser, argv)
    args = parser.parse_args(argv)
    try:
        raw = args.vllm_args
        vllm_args = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise UsageError(f"--vllm-args: not valid JSON ({exc})") from exc
    if not isinstance(vllm_args, dict):
        raise UsageError("--vllm-args: expected a JSON object")
    from rejalign_tasks.judge.run import judge_run_dirs

    files = judge_run_dirs(
        args.run_dirs,
        args.judge,
        args.judge_model,
        args.engine,
        variant=args.judge_variant,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        adapter=args.adapter,
        vllm_args=vllm_args,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    for path in files:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``rejalign-judge``): 0 done, 1 failed, 2 bad input, 130 interrupted."""
    from rejalign_tasks.report.errors import ReportInputError

    return run_command(
        PROG,
        _run,
        argv,
        usage_errors=(ReportInputError,),
        interrupted="interrupted; rerun the same command to continue where it stopped",
    )


if __name__ == "__main__":
    sys.exit(main())
