"""Print a pip constraints file pinning every direct dependency of rejalign at its declared floor.

    python .ci/floors.py [EXTRA ...] > floors.txt

CI installs the package against this file as a second environment and runs the whole suite in it,
so the lower bounds pyproject.toml declares are bounds the suite has passed with. A dependency
without a lower bound is an error: its floor would be untested.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement


def floors(extras: list[str]) -> list[str]:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for text in requirements:
        req = Requirement(text)
        lower = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        if len(lower) != 1:
            raise SystemExit(f"floors: {text!r} has no single lower bound")
        pins.append(f"{req.name}=={lower[0]}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(sys.argv[1:])))
