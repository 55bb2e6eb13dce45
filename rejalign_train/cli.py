"""``rejalign-train``: build refusal-mixed data (``mix``) and LoRA-finetune a VLM on it (``fit``).

    rejalign-train mix ...      see ``rejalign-train mix --help``
    rejalign-train fit ...      see ``rejalign-train fit --help``

Errors in the user's input (a bad record, a missing image, an output folder in the way) end the
command with exit status 2 and one line that names the file, record and field, not a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

USAGE = "usage: rejalign-train {mix,fit} [options]   (rejalign-train SUBCOMMAND --help for details)"


def _user_errors() -> tuple[type[BaseException], ...]:
    from rejalign_train.fit import FitError
    from rejalign_train.records import RecordError

    return (FitError, RecordError)


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "mix":
        from rejalign_train.mixing import main as mix_main

        return mix_main(rest)
    if command != "fit":
        print(f"rejalign-train: unknown subcommand {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging()
    from rejalign_train.fit import main as fit_main

    try:
        return fit_main(rest)
    except _user_errors() as exc:
        print(f"rejalign-train fit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
