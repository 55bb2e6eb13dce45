"""One command-line convention for every rejalign console script.

``rejalign-train``, ``rejalign-eval``, ``rejalign-report`` and ``rejalign-sweep`` all follow it:

* **exit status**: 0 done; 1 the work itself failed (a training step, an evaluation run);
  2 the user's input is wrong (usage, an option, a configuration file, a bad record, a missing
  file) — reported as one line ``PROG: error: MESSAGE`` on stderr, never a traceback;
  130 interrupted (Ctrl-C), after saying how to continue;
* **help**: argparse's layout (``usage:``, a description, the options, an epilog), so
  ``PROG --help`` and ``PROG SUBCOMMAND --help`` read alike;
* **configuration files**: a ``.yaml``/``.yml``/``.json`` file given as the first argument sets
  the options' defaults (names with ``-`` or ``_``); flags after it override it. Unknown names
  are an error that names the file.

Import-light on purpose: a console script's ``--help`` should not wait for torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class UsageError(Exception):
    """The user's input is wrong; the message names the file, record and field. Exit 2."""


class CommandFailed(Exception):
    """The work failed after the input was accepted (a step, a run). Exit 1."""


def config_file_arg(argv: Sequence[str]) -> Path | None:
    """The configuration file given as the first argument, if any."""
    if argv and not argv[0].startswith("-") and Path(argv[0]).suffix.lower() in CONFIG_SUFFIXES:
        return Path(argv[0])
    return None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML/JSON mapping of option names (``-`` read as ``_``) to values."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the configuration file ({exc})") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc})") from exc
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_config_defaults(
    parser: argparse.ArgumentParser,
    config: dict[str, Any],
    path: str | Path,
    hint: str = "",
) -> None:
    """Make the file's values the parser's defaults (flags still override them).

    Options the file sets are no longer required on the command line. A name the parser does
    not know is an error naming the file (``hint`` is appended to that message).
    """
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UsageError(f"{path}: unknown option(s) {', '.join(unknown)}{hint}")
    for action in parser._actions:
        if action.dest in config:
            action.default = config[action.dest]
            action.required = False


def split_config(
    parser: argparse.ArgumentParser, argv: Sequence[str], hint: str = ""
) -> tuple[list[str], dict[str, Any]]:
    """Apply a leading configuration file to ``parser``; return the remaining flags and the
    file's mapping (empty without a file)."""
    argv = list(argv)
    path = config_file_arg(argv)
    if path is None:
        return argv, {}
    config = load_config_file(path)
    apply_config_defaults(parser, config, path, hint)
    return argv[1:], config


def error(prog: str, message: object) -> None:
    """The one-line error every command prints."""
    print(f"{prog}: error: {message}", file=sys.stderr)


def run_command(
    prog: str,
    body: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    *,
    usage_errors: Iterable[type[BaseException]] = (),
    failures: Iterable[type[BaseException]] = (),
    interrupted: str = "interrupted",
) -> int:
    """Run a command's body under the convention; return its exit status.

    ``usage_errors`` are exceptions of the user's input (exit 2), ``failures`` of the work
    (exit 1); argparse's own exits (``--help``: 0, a bad flag: 2) pass through as they are.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    bad_input = (UsageError, *usage_errors)
    failed = (CommandFailed, *failures)
    try:
        status = body(argv)
    except SystemExit as exc:  # argparse: --help, or a usage error it has already printed
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    except bad_input as exc:
        error(prog, exc)
        return EXIT_USAGE
    except failed as exc:
        error(prog, exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if status is None else int(status)
