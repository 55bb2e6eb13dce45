"""``rejalign-train``: build refusal-mixed data (``mix``) and LoRA-finetune a VLM on it (``fit``).

    rejalign-train mix [CONFIG.yaml] ...      see ``rejalign-train mix --help``
    rejalign-train fit [CONFIG.yaml] ...      see ``rejalign-train fit --help``

Both follow :mod:`rejalign_tasks.console`: errors in the user's input (a bad record, a missing
image, an output folder in the way, an unknown option) end the command with exit status 2 and one
line that names the file, record and field, not a traceback; Ctrl-C ends it with 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from rejalign_tasks.console import run_command

PROG = "rejalign-train"


def _mix(argv: list[str]) -> int:
    from rejalign_train.mixing import main as mix_main

    return mix_main(argv)


def _fit(argv: list[str]) -> int:
    _setup_logging()
    from rejalign_train.fit import main as fit_main

    return fit_main(argv)


SUBCOMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "mix": (_mix, "draw refusal and normal records into one training file"),
    "fit": (_fit, "LoRA-finetune a vision-language model on the mixed data"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the subcommands; each parses its own options."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Refusal-mixed training data (mix) and LoRA finetuning on it (fit).",
        epilog=f"Each subcommand takes its own options, and an optional YAML/JSON configuration "
        f"file as its first argument: {PROG} mix --help, {PROG} fit --help.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{mix,fit}", required=True)
    for name, (_, summary) in SUBCOMMANDS.items():
        sub.add_parser(name, help=f"{summary} (see {PROG} {name} --help)", add_help=False)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Only rejalign's own messages at INFO, and only from the main process of a distributed run;
    # libraries keep their defaults.
    logging.getLogger().setLevel(logging.WARNING)
    main_process = os.environ.get("RANK", "0") == "0"
    logging.getLogger("rejalign_train").setLevel(logging.INFO if main_process else logging.WARNING)


def _run(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        run, _ = SUBCOMMANDS[argv[0]]
        return run(argv[1:])
    parser = build_parser()
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        parser.error(
            f"unrecognized arguments: {argv[0]} (a subcommand's options go after it; "
            f"see {PROG} mix --help, {PROG} fit --help)"
        )
    parser.parse_args(argv)  # --help: exits 0; no or an unknown subcommand: usage, exits 2
    parser.error(f"the subcommand comes first: {PROG} {{mix,fit}} ...")


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``rejalign-train``); returns the exit status."""
    return run_command(PROG, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
