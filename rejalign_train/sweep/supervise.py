"""Process supervision: the sweep's children die with it, and one sweep runs per folder.

Each fit and eval runs as a subprocess (the model is loaded in a fresh process, and
``--fit-launcher`` can be ``accelerate launch`` or ``torchrun``), with its output in the step's
log file. A sweep killed, even by SIGKILL, must not leave hours of orphan training behind, nor
let a second sweep write into the same folders at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from rejalign_train.sweep.options import SweepError

LOCK_NAME = ".rejalign-sweep.lock"
LOG_TAIL_LINES = 30


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when the sweep dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os._exit(1)


def stop(proc: subprocess.Popen, grace: float = 30) -> None:
    """Terminate a child, and kill it if it has not exited after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_logged(cmd: list[str], log: Path, echo: bool, what: str) -> None:
    """Run ``cmd`` with its output in ``log`` (and on stdout with ``echo``); fail loudly.

    An exception in the sweep (Ctrl-C included) terminates the child before it propagates; a
    child that fails raises a SweepError quoting the end of its log.
    """
    env = {**os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    with open(log, "wb") as out:
        out.write(f"$ {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec
        )
        assert proc.stdout is not None
        stdout = proc.stdout
        try:
            for chunk in iter(lambda: stdout.read1(1 << 16), b""):
                out.write(chunk)
                out.flush()
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            code = proc.wait()
        except BaseException:
            stop(proc)
            raise
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
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
