"""``rejalign-sweep [CONFIG.yaml] [--options]``: the console script, under rejalign's convention.

Exit status 0 done, 2 a bad option (caught before any step runs), 1 a step failed, 130
interrupted (a rerun of the same command continues where it stopped).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Sequence

from rejalign_tasks.console import UsageError, run_command
from rejalign_train.sweep.judging import check_judge
from rejalign_train.sweep.options import PROG, SweepError, check_config, parse_args

logger = logging.getLogger("rejalign_train.sweep")


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s rejalign-sweep %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _body(argv: list[str]) -> int:
    _setup_logging()
    try:
        cfg = parse_args(argv)
        check_config(cfg)
        check_judge(cfg.args)
    except SweepError as exc:  # found before any step ran: the user's options are wrong (2)
        raise UsageError(str(exc)) from exc
    from rejalign_train.sweep.pipeline import REPORT_DIR, Sweep
    from rejalign_train.sweep.supervise import sweep_lock

    with sweep_lock(cfg.root) if not cfg.args.dry_run else contextlib.nullcontext():
        records = Sweep(cfg).run()
    ran = sum(r.state == "ran" for r in records)
    skipped = sum(r.state == "skipped" for r in records)
    if cfg.args.dry_run:
        todo = len(records) - skipped
        print(f"{PROG}: dry run: {todo} step(s) to run, {skipped} finished")
    else:
        done = f"{PROG}: {ran} step(s) run, {skipped} skipped"
        if cfg.args.stop_after == "report":
            done += f"; report: {cfg.root / REPORT_DIR / 'report.md'}"
        else:
            done += f"; stopped after the {cfg.args.stop_after} steps (--stop-after)"
        print(done)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; return its exit status (0 done, 1 a step failed, 2 bad options, 130)."""
    return run_command(
        PROG,
        _body,
        argv,
        failures=(SweepError,),
        interrupted="interrupted; rerun the same command to continue",
    )


if __name__ == "__main__":
    sys.exit(main())
