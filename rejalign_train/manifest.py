"""``rejalign_manifest.json``: what a finished adapter was trained on, how, and with what.

The manifest is the last file written into an adapter folder before the folder is moved into
place, and the folder is moved only when everything else is in it: a folder holding a manifest
with ``"complete": true`` is a finished run, anything else is not (:func:`is_finished`).
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from rejalign_tasks.contracts import MANIFEST_NAME, sha256_file, write_text_atomic

MANIFEST_FORMAT = "rejalign-fit/1"
_LIBRARIES = (
    "rejalign",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "lm_eval",
    "deepspeed",
    "pillow",
)

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "is_finished",
    "library_versions",
    "read_manifest",
    "sha256_file",
    "utc_now",
    "write_json_atomic",
]


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide what training computes."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """JSON through a temporary file and a rename: a crash never leaves half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of ``folder``, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_finished(folder: str | os.PathLike) -> bool:
    """True only for the output folder of a completed ``fit``."""
    manifest = read_manifest(folder)
    return bool(manifest and manifest.get("format") == MANIFEST_FORMAT and manifest.get("complete"))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
