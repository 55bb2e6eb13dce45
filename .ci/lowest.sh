# Sourced by .ci/run after the suite has passed at the pinned newest versions: the same suite at
# the lowest versions pyproject.toml allows, so that its lower bounds are bounds the suite has
# passed with. .ci/floors.py pins every direct dependency (and the test and deepspeed extras)
# exactly at its declared floor; everything else resolves as a user's pip would resolve it. Its
# own Hugging Face cache: datasets' cache files are not shared across its versions.
# Left out of this second pass (they ran in the first): test files that run wholly in the vLLM
# environment's interpreter, whose versions this pass does not change (test_qwen2vl,
# test_vllm_model_images), the single tests that run there (vLLM's half of the per-family, judge
# engine and Llama Guard 4 comparisons), and the demo, which chains the same real commands
# test_sweep and test_train_e2e run here. This keeps .ci/run within its time budget.
# Usable on its own too, after .ci/run's set-up:  source .ci/lowest.sh

_rejalign_lowest() {
  local root low
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
  low=${REJALIGN_CI_LOWEST_VENV:-$root/.ci-cache/venv-lowest}
  echo "lowest: building the environment at the declared floors in $low"
  rm -rf "$low"
  python3 -m venv "$low" \
    && "$low/bin/python" -m pip install -q --upgrade pip \
    && "$low/bin/python" -m pip install -q packaging \
    && "$low/bin/python" "$root/.ci/floors.py" test deepspeed > "$low/floors.txt" \
    && DS_BUILD_OPS=0 "$low/bin/python" -m pip install -q -c "$low/floors.txt" -e "$root[test,deepspeed]" \
    && "$low/bin/python" -m pip check \
    && "$low/bin/python" -m pip freeze --exclude-editable > "$low/freeze.txt" \
    && echo "lowest: $(tr '\n' ' ' < "$low/floors.txt")" \
    && (cd "$root" && HF_HOME="$root/.ci-cache/hf-lowest" "$low/bin/python" -m pytest -q tests \
         --ignore tests/test_qwen2vl.py --ignore tests/test_vllm_model_images.py \
         --ignore tests/test_demo.py \
         --deselect tests/test_families.py::test_vllm_vlm_with_the_fit_adapter_equals_hf_multimodal \
         --deselect tests/test_judge_cli.py::test_vllm_and_transformers_give_the_same_labels \
         --deselect tests/test_judge_prompts.py::test_tiny_llama_guard_4_in_the_vllm_environment)
}

_rejalign_lowest
unset -f _rejalign_lowest
