"""rejalign's lm-evaluation-harness tasks: image-borne attack, over-refusal and utility benchmarks.

Kept import-light on purpose: ``rejalign.pth`` imports this package at interpreter start-up to
install the task-discovery hook (see ``_autoload``), so nothing heavy may be imported here.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def task_configs_dir() -> Path:
    """The folder holding rejalign's task YAML files (inside the wheel, or the checkout's)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "task_configs", here.parent / "task_configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"rejalign task configs not found next to {here}: the installation is incomplete"
    )
