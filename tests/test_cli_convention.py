"""Every console script follows one convention (rejalign_tasks.console), run as a user runs it.

Each script is started in a fresh interpreter from its entry point in pyproject.toml and checked
for: ``--help`` exits 0 with argparse's ``usage:`` line; an unknown flag exits 2 with a usage or
error line and no traceback; a leading configuration file with an unknown key exits 2 with one
``PROG: error:`` line that names the file (for the commands that take configuration files).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
MIX_FIXTURES = Path(__file__).parent / "fixtures" / "mix"
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
    "project"
]["scripts"]

# command -> (console script, its leading arguments, arguments that make every other option valid)
COMMANDS: dict[str, tuple[str, list[str], list[str]]] = {
    "rejalign-train": ("rejalign-train", [], []),
    "rejalign-train mix": (
        "rejalign-train",
        ["mix"],
        ["--refusal_source", "r.json", "--output", "m.jsonl", "--num_refusal", "1"],
    ),
    "rejalign-train fit": (
        "rejalign-train",
        ["fit"],
        ["--model", "m", "--data", "d.jsonl", "--output_dir", "o"],
    ),
    "rejalign-report": ("rejalign-report", ["table"], ["runs", "-o", "out"]),
    "rejalign-eval": ("rejalign-eval", [], ["--output_path", "out"]),
    "rejalign-sweep": (
        "rejalign-sweep",
        [],
        ["--model", "m", "--refusal_source", "r.json", "--output_dir", "o", "--total", "4"],
    ),
    "rejalign-demo": ("rejalign-demo", [], ["--output-dir", "o"]),
    "rejalign-judge": ("rejalign-judge", [], ["runs", "--judge", "llama-guard-3"]),
}
TAKE_CONFIG_FILES = (
    "rejalign-train mix",
    "rejalign-train fit",
    "rejalign-sweep",
    "rejalign-demo",
    "rejalign-judge",
)


def run_script(command: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Start ``command``'s entry point (``module:function`` from pyproject) with ``args``."""
    script, leading, _ = COMMANDS[command]
    module, _, function = SCRIPTS[script].partition(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    return subprocess.run(
        [sys.executable, "-c", code, *leading, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_every_console_script_is_covered():
    assert {script for script, _, _ in COMMANDS.values()} == set(SCRIPTS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_exits_0_with_usage(command, tmp_path):
    proc = run_script(command, ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.lower().startswith("usage:") for line in proc.stdout.splitlines()), proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_flag_exits_2_without_traceback(command, tmp_path):
    _, _, valid = COMMANDS[command]
    proc = run_script(command, [*valid, "--no-such-flag"], tmp_path)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "usage" in proc.stderr or "error:" in proc.stderr, proc.stderr
    assert "no-such-flag" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("command", TAKE_CONFIG_FILES)
def test_config_file_with_unknown_key_is_one_error_naming_the_file(command, suffix, tmp_path):
    config = tmp_path / f"options{suffix}"
    config.write_text(json.dumps({"no_such_key": 1}), encoding="utf-8")  # JSON is YAML too
    proc = run_script(command, [str(config)], tmp_path)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"{command}: error: "), errors[0]
    assert str(config) in errors[0] and "no_such_key" in errors[0], errors[0]


def test_mix_takes_a_leading_config_file_that_flags_override(tmp_path, capsys):
    """The convention's configuration file, for ``mix`` as for ``fit`` and the sweep."""
    from rejalign_train.mixing import main, manifest_path

    out = tmp_path / "mixed.jsonl"
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"refusal-source: {MIX_FIXTURES / 'refusal.json'}\n"
        f"normal_source: {MIX_FIXTURES / 'normal.json'}\n"
        f"output: {out}\nnum_refusal: 1\nnum_normal: 1\n",
        encoding="utf-8",
    )
    assert main([str(config), "--num_normal", "2"]) == 0, capsys.readouterr().err
    manifest = json.loads(manifest_path(out).read_text(encoding="utf-8"))
    assert (manifest["counts"]["refusal"], manifest["counts"]["normal"]) == (1, 2)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
