"""Contracts both halves of rejalign share, each defined once.

The trainer writes what the tasks and the report read (manifest files, the refusal sentence the
judges look for, the image placeholder of LLaVA-format records), so the names live here and
``rejalign_train`` imports them: the dependency runs train -> tasks only. Also the small I/O
helpers every writer uses (atomic writes, sha256 of a file, rejalign's cache folder).

Import-light on purpose (standard library only).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: The paper's refusal sentence (upstream ``mix_rejection_data.py``), the default of ``mix``.
REFUSAL_SENTENCE = "I'm sorry, but I cannot assist with your request"
#: LLaVA-format placeholder marking where an image goes in a user turn.
IMAGE_PLACEHOLDER = "<image>"
#: The provenance file ``rejalign-train mix`` writes beside its data and ``fit`` into an adapter.
MANIFEST_NAME = "rejalign_manifest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    On error the temporary file is removed and ``target`` is left as it was. The new file gets
    the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(target: str | Path, text: str) -> Path:
    """Write ``text`` to ``target`` so readers see the old file or the whole new one."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(target)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """rejalign's folder inside the Hugging Face datasets cache."""
    if os.environ.get("HF_DATASETS_CACHE"):
        base = Path(os.environ["HF_DATASETS_CACHE"])
    else:
        hf_home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
        )
        base = Path(hf_home) / "datasets"
    return base / "rejalign"
