"""The sweep's content-addressed step cache: is a step's folder finished work for these inputs?

A sweep takes hours to days, and it gets interrupted. A step is finished only when its folder
holds ``rejalign_step.json``, written atomically as the step's last act; the marker records the
step's inputs (and their digest, its ``key``) and the digests of what the step wrote. A step
counts as finished, and is skipped, only while its marker matches the inputs it would run with
and its outputs are still the ones recorded; anything else is redone from an empty folder.

The names, the format tag and the digests below are what existing sweep folders hold on disk:
change them and every finished step of every sweep is redone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from rejalign_tasks.contracts import sha256_file
from rejalign_train.manifest import library_versions, utc_now, write_json_atomic

STEP_MARKER = "rejalign_step.json"
STEP_STARTED = "rejalign_step.started.json"
STEP_FORMAT = "rejalign-sweep-step/1"


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces): a step's key."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_key(value: str) -> str | dict:
    """A pass-through value; one naming a file stands for the file's content too."""
    path = Path(value).expanduser()
    if path.is_file():
        return {"file": value, "sha256": sha256_file(path)}
    return value


def argv_key(argv: list[str]) -> list:
    """A tool's argument list as step inputs: values naming files count by their content."""
    return [file_key(a) if not a.startswith("-") else a for a in argv]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class StepCache:
    """The markers of one step's folder: its status, and marking it started and finished.

    The started marker (``rejalign_step.started.json``) only says which inputs the work now in
    the folder began with, so that an interrupted fit may resume its checkpoint; it never makes
    a step finished.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def marker_path(self) -> Path:
        return self.folder / STEP_MARKER

    @property
    def started_path(self) -> Path:
        return self.folder / STEP_STARTED

    def read_marker(self) -> dict | None:
        """The finished marker, or None when there is none (or none of this format)."""
        data = _read_json(self.marker_path)
        return data if data is not None and data.get("format") == STEP_FORMAT else None

    def status(self, inputs: dict) -> tuple[dict | None, str]:
        """(the marker, when the step is finished with these inputs and intact outputs; why not)."""
        if not self.folder.exists():
            return None, "not run yet"
        marker = self.read_marker()
        if marker is None:
            if self.marker_path.exists():
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
            path = self.folder / name
            if not path.is_file() or sha256_file(path) != expected:
                return None, f"output {name} changed or missing since the step finished"
        return marker, "finished"

    def started_with(self, inputs: dict) -> bool:
        """Whether unfinished work in the folder was started with these inputs."""
        if not self.folder.exists() or self.read_marker() is not None:
            return False
        started = _read_json(self.started_path)
        return bool(started and started.get("key") == digest(inputs))

    def clear(self) -> None:
        """Remove the folder: the marker first, so a crash never leaves it beside partial work."""
        self.marker_path.unlink(missing_ok=True)
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def mark_started(self, inputs: dict) -> str:
        """Record the inputs the work begins with; return the start time (for the marker)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        started = utc_now()
        write_json_atomic(self.started_path, {"key": digest(inputs), "started": started})
        return started

    def output_digests(self, paths: list[Path]) -> dict[str, str]:
        """sha256 of each output file, by its path relative to the folder."""
        return {str(p.relative_to(self.folder)): sha256_file(p) for p in sorted(paths)}

    def mark_finished(
        self,
        step: str,
        inputs: dict,
        outputs: dict[str, str],
        *,
        started: str,
        seconds: float,
        resumed: bool,
    ) -> dict:
        """Write the finished marker atomically (the step's last act); return it."""
        marker = {
            "format": STEP_FORMAT,
            "step": step,
            "key": digest(inputs),
            "inputs": inputs,
            "outputs": outputs,
            "outputs_digest": digest(outputs),
            "started": started,
            "finished": utc_now(),
            "seconds": seconds,
            "resumed": resumed,
            "versions": library_versions(),
        }
        write_json_atomic(self.marker_path, marker)
        return marker
