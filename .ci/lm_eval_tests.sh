# Sourced by .ci/run after the main environment is built: lm-eval's own test suite, from the
# sdist of exactly the lm-eval version installed in $VENV, for tests/test_host_suite.py (which runs
# it with rejalign's import hook on and off and requires identical outcomes).
#
# Unpacks, from lm_eval-<version>.tar.gz, into .ci-cache/lm_eval_tests/<version>/:
#   tests/          lm-eval's test modules
#   lm_eval/tasks/  lm-eval's task folder, which some tests read through their rootdir
#                   (`{rootpath}/lm_eval/tasks/arc/arc_easy.yaml`, `tests/../lm_eval/tasks/bbh`);
#                   only data files are read from it, lm_eval itself is imported from $VENV.
# A complete unpack is kept (marked by .complete) and reused without downloading again.
#
# Exports REJALIGN_LM_EVAL_TESTS=<that tests folder>; returns non-zero (fails .ci/run) if it cannot.
# Usable on its own too:  source .ci/lm_eval_tests.sh   (VENV defaults to .venv beside .ci/)

_rejalign_lm_eval_tests() {
  local root venv py version dest work sdist rc
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
  venv=${VENV:-${REJALIGN_CI_VENV:-$root/.venv}}
  py=$venv/bin/python
  if [ ! -x "$py" ]; then
    echo "lm_eval_tests: no interpreter at $py (build the environment first)" >&2
    return 1
  fi
  version=$("$py" -c 'import importlib.metadata as m; print(m.version("lm_eval"))') || {
    echo "lm_eval_tests: lm_eval is not installed in $venv" >&2
    return 1
  }
  dest=$root/.ci-cache/lm_eval_tests/$version

  if [ ! -f "$dest/.complete" ]; then
    work=$(mktemp -d "${TMPDIR:-/tmp}/rejalign-lm-eval-sdist.XXXXXX") || return 1
    echo "lm_eval_tests: fetching the lm-eval $version sdist" >&2
    # The machine's pip configuration (find-links, extra indexes) may serve it locally; with
    # --no-binary :all: only an sdist is accepted, and ==$version pins it exactly.
    "$py" -m pip download -q --no-binary :all: --no-deps "lm-eval==$version" -d "$work/dl" >&2
    rc=$?
    sdist=$(find "$work/dl" -maxdepth 1 -name '*.tar.gz' 2>/dev/null | head -n 1)
    if [ "$rc" -ne 0 ] || [ -z "$sdist" ]; then
      echo "lm_eval_tests: could not download the lm-eval $version sdist (pip exit $rc)" >&2
      rm -rf "$work"
      return 1
    fi
    # Unpack tests/ and lm_eval/tasks/ only after checking the sdist's own version.
    "$py" - "$sdist" "$version" "$work/unpacked" <<'EOF' >&2
import sys
import tarfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

sdist, version, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
with tarfile.open(sdist) as tf:
    members = tf.getmembers()
    top = {PurePosixPath(m.name).parts[0] for m in members}
    if len(top) != 1:
        sys.exit(f"lm_eval_tests: {sdist}: expected one top-level folder, found {sorted(top)}")
    (top,) = top
    info = tf.extractfile(f"{top}/PKG-INFO")
    found = Parser().parsestr(info.read().decode("utf-8")).get("Version") if info else None
    if found != version:
        sys.exit(f"lm_eval_tests: {sdist} is lm-eval {found}, not the installed {version}")
    wanted = []
    for m in members:
        parts = PurePosixPath(m.name).parts[1:]
        if parts[:1] == ("tests",) or parts[:2] == ("lm_eval", "tasks"):
            if not (m.isfile() or m.isdir()):
                continue
            m.name = str(PurePosixPath(*parts))
            wanted.append(m)
    out.mkdir(parents=True)
    try:
        tf.extractall(out, members=wanted, filter="data")
    except TypeError:  # a Python without extraction filters: the members are checked above
        tf.extractall(out, members=wanted)
modules = sorted(p.name for p in (out / "tests").glob("test_*.py"))
if not modules:
    sys.exit(f"lm_eval_tests: {sdist} holds no tests/test_*.py")
print(f"lm_eval_tests: unpacked {len(modules)} test modules of lm-eval {version}")
EOF
    rc=$?
    if [ "$rc" -ne 0 ]; then
      echo "lm_eval_tests: could not unpack $sdist" >&2
      rm -rf "$work"
      return 1
    fi
    touch "$work/unpacked/.complete" &&
      mkdir -p "$(dirname "$dest")" &&
      rm -rf "$dest" &&
      mv "$work/unpacked" "$dest"
    rc=$?
    rm -rf "$work"
    if [ "$rc" -ne 0 ]; then
      echo "lm_eval_tests: could not move the unpacked tests to $dest" >&2
      return 1
    fi
  fi

  export REJALIGN_LM_EVAL_TESTS=$dest/tests
  echo "lm_eval_tests: REJALIGN_LM_EVAL_TESTS=$REJALIGN_LM_EVAL_TESTS" >&2
}

# Called in a `||` list so that the caller's `set -e` does not cut the function short before its
# own error message; every step's status is checked inside.
_rejalign_lm_eval_tests_rc=0
_rejalign_lm_eval_tests || _rejalign_lm_eval_tests_rc=$?
unset -f _rejalign_lm_eval_tests
if [ "$_rejalign_lm_eval_tests_rc" -ne 0 ]; then
  unset _rejalign_lm_eval_tests_rc
  echo "lm_eval_tests: FAILED: lm-eval's test suite is not available" >&2
  # `return` when sourced (fails .ci/run under set -e), `exit` when run as a script.
  return 1 2>/dev/null || exit 1
fi
unset _rejalign_lm_eval_tests_rc
