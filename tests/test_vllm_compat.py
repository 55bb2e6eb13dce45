"""rejalign_tasks.harness.vllm_compat's fixes to lm-eval's vLLM layer, checked without vLLM.

The end-to-end checks through ``lm_eval --model vllm-vlm`` live in test_vllm_e2e.py.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from rejalign_tasks.harness import fixes, vllm_compat
from rejalign_tasks.harness.vllm_adapter import (
    FOLDED_WEIGHTS,
    AdapterConfigError,
    adapter_rank,
    prepared_root,
    vllm_loadable,
    vllm_max_lora_rank,
)
from rejalign_tasks.harness.vllm_compat import LazyRay


def _adapter(tmp_path, config) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (tmp_path / "adapter_config.json").write_text(text)
    return str(tmp_path)


def test_adapter_rank_reads_r_and_rank_pattern(tmp_path):
    assert adapter_rank(_adapter(tmp_path / "a", {"r": 128, "lora_alpha": 256})) == 128
    assert adapter_rank(_adapter(tmp_path / "b", {"r": 8, "rank_pattern": {"q_proj": 64}})) == 64


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "adapter_config.json not found"),
        ("{not json", "unreadable"),
        ("[1, 2]", "expected a JSON object"),
        ({"lora_alpha": 16}, "holds None"),
        ({"r": "128"}, "holds '128'"),
        ({"r": 0}, "holds 0"),
        ({"r": 8, "rank_pattern": ["q_proj"]}, "'rank_pattern' must be an object"),
    ],
)
def test_adapter_rank_errors_name_file_and_field(tmp_path, content, message):
    folder = str(tmp_path) if content is None else _adapter(tmp_path, content)
    with pytest.raises(AdapterConfigError, match=message) as info:
        adapter_rank(folder)
    assert str(tmp_path) in str(info.value)


def test_max_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 16, 100, 128, 300, 512)] == [
        1, 8, 8, 16, 128, 128, 320, 512
    ]
    with pytest.raises(AdapterConfigError, match="exceeds"):
        vllm_max_lora_rank(1024)


def _module_from(path, name):
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    return loader, importlib.util.module_from_spec(spec)


@pytest.fixture
def as_vllm_vlms(monkeypatch):
    """Run a stand-in source file as if it were lm-eval's vllm_vlms module (fresh fix status)."""
    monkeypatch.setattr(fixes, "_STATUS", {})
    monkeypatch.setattr(fixes, "_WARNED", set())

    def run(path: Path):
        name = "lm_eval.models.vllm_vlms"
        loader, module = _module_from(path, name)
        fixes.exec_with_fixes(loader, module)
        return module

    return run


def test_vllm_vlms_loads_without_ray(tmp_path, monkeypatch, as_vllm_vlms):
    """The module-level ``import ray`` is dropped when ray is missing; ray is needed only later."""
    source = tmp_path / "fake_vllm_vlms.py"
    source.write_text("import os\nimport ray\n\ndef dp():\n    return ray.remote\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    module = as_vllm_vlms(source)
    assert isinstance(module.ray, LazyRay) and module.os is sys.modules["os"]
    assert fixes.status()["vllm-lazy-ray"][0] == "on"
    with pytest.raises(ModuleNotFoundError, match="pip install ray"):
        module.dp()


def test_vllm_vlms_untouched_when_ray_is_installed(tmp_path, monkeypatch, as_vllm_vlms):
    source = tmp_path / "fake_vllm_vlms2.py"
    source.write_text("import ray\nx = ray.remote\n")
    fake_ray = type(sys)("ray")
    fake_ray.__spec__ = importlib.machinery.ModuleSpec("ray", None)
    fake_ray.remote = object()
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    module = as_vllm_vlms(source)
    assert module.ray is fake_ray
    assert fixes.status()["vllm-lazy-ray"][0] == "not needed"


def test_vllm_vlms_import_gone_turns_the_fix_off_with_one_warning(
    tmp_path, monkeypatch, caplog, as_vllm_vlms
):
    """Fixed upstream (no module-level import): executed as it is, one warning, no stand-in."""
    monkeypatch.setitem(sys.modules, "ray", None)
    source = tmp_path / "fake_vllm_vlms3.py"
    source.write_text("def dp():\n    import ray\n    return ray.remote\n")
    with caplog.at_level("WARNING", logger="rejalign_tasks.harness"):
        module = as_vllm_vlms(source)
        as_vllm_vlms(source)  # a second load: still one warning
    assert not hasattr(module, "ray") and callable(module.dp)
    state, reason = fixes.status()["vllm-lazy-ray"]
    assert state == "off" and "import ray" in reason
    warnings = [r for r in caplog.records if "vllm-lazy-ray" in r.getMessage()]
    assert len(warnings) == 1


def test_real_vllm_vlms_source_has_the_import_we_drop():
    """Guards the fix against lm-eval changes: its vllm_vlms.py still imports ray at top level."""
    import ast

    spec = importlib.util.find_spec("lm_eval.models.vllm_vlms")
    source = spec.loader.get_source("lm_eval.models.vllm_vlms")
    assert fixes.rewrite_import(ast.parse(source), "import ray") is None
    assert vllm_compat.check_vllm_vlms(source) is None


def test_cli_batch_size_defaults_to_auto_for_vllm_only(tmp_path, monkeypatch):
    from lm_eval._cli import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig

    def _cli_config(*argv: str):
        """Parse ``argv`` with lm-eval's real CLI parser and build its EvaluatorConfig."""
        monkeypatch.setattr(sys, "argv", ["lm_eval", "run", *argv])
        return EvaluatorConfig.from_cli(HarnessCLI().parse_args())

    assert getattr(EvaluatorConfig.from_cli.__func__, "_rejalign_patched", False)
    tasks = ["--tasks", "rejalign_figstep_tiny"]
    assert _cli_config("--model", "vllm-vlm", *tasks).batch_size == "auto"
    assert _cli_config("--model", "vllm", *tasks).batch_size == "auto"
    assert _cli_config("--model", "vllm-vlm", *tasks, "--batch_size", "1").batch_size == "1"
    assert _cli_config("--model", "vllm-vlm", *tasks, "-b", "8").batch_size == "8"
    assert _cli_config("--model", "hf-multimodal", *tasks).batch_size == 1
    config = tmp_path / "run.yaml"
    config.write_text("model: vllm-vlm\ntasks: [rejalign_figstep_tiny]\nbatch_size: 4\n")
    assert _cli_config("--config", str(config)).batch_size == 4
    config.write_text("model: vllm-vlm\ntasks: [rejalign_figstep_tiny]\n")
    assert _cli_config("--config", str(config)).batch_size == "auto"


# --------------------------------------------------------------------------- full modules


@pytest.fixture(scope="module")
def projector_adapter(tiny_llava, tmp_path_factory):
    """A peft adapter like rejalign-train fit's: LoRA on the language model, projector in full."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)",
        modules_to_save=["model.multi_modal_projector"],
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            torch.nn.init.normal_(param, std=0.05)
    out = tmp_path_factory.mktemp("projector-adapter")
    peft_model.save_pretrained(out)
    return out


def _projector_inputs(tiny_llava):
    import torch
    from transformers import AutoConfig

    torch.manual_seed(0)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    pixels = torch.randn(1, 3, 32, 32)
    image_token = AutoConfig.from_pretrained(tiny_llava).image_token_id
    ids = torch.cat([ids[:, :1], torch.full((1, 16), image_token), ids[:, 1:]], dim=1)
    return ids, pixels


def _peft_logits(base: str, adapter: str, inputs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    ids, pixels = inputs
    model = AutoModelForImageTextToText.from_pretrained(base)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return peft_model(input_ids=ids, pixel_values=pixels).logits


def _listed_files(model_dir: Path) -> dict[str, list[str]]:
    """The weight files the prepared index names, each with the tensor names it holds.

    vLLM and transformers read every tensor of each of these files, so no name may be in two.
    """
    from safetensors import safe_open

    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    held = {}
    for name in sorted(set(weight_map.values())):
        with safe_open(str(model_dir / name), "pt") as fh:
            held[name] = sorted(fh.keys())
    everything = [k for keys in held.values() for k in keys]
    assert len(everything) == len(set(everything)), "a tensor name is in two listed files"
    assert sorted(everything) == sorted(weight_map)
    assert all(name in held[weight_map[name]] for name in weight_map)
    return held


def test_full_modules_folded_into_a_cached_base_copy(
    tiny_llava, projector_adapter, tmp_path, monkeypatch
):
    """Base+projector as the model and the LoRA alone compute what peft computes."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    model_dir, adapter_dir = vllm_loadable(str(tiny_llava), str(projector_adapter))
    assert Path(model_dir).parent.parent == prepared_root()
    stripped = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    assert stripped["modules_to_save"] is None and stripped["r"] == 16
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as fh:
        assert all(".lora_" in key for key in fh.keys())
    assert (Path(model_dir) / "config.json").is_symlink()  # unchanged files are links
    # One file: it held the old projector too, so it is rewritten without it, under a name that
    # keeps transformers on the index (it takes a model.safetensors over an index).
    assert not (Path(model_dir) / "model.safetensors").exists()
    held = _listed_files(Path(model_dir))
    assert set(held) == {"rejalign-model.safetensors", FOLDED_WEIGHTS}
    assert not (Path(model_dir) / "rejalign-model.safetensors").is_symlink()
    assert all("multi_modal_projector" in k for k in held[FOLDED_WEIGHTS])
    assert not any("multi_modal_projector" in k for k in held["rejalign-model.safetensors"])

    inputs = _projector_inputs(tiny_llava)
    expected = _peft_logits(str(tiny_llava), str(projector_adapter), inputs)
    assert torch.equal(_peft_logits(model_dir, adapter_dir, inputs), expected)
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava).eval()
    with torch.no_grad():
        plain = PeftModel.from_pretrained(base, adapter_dir).eval()
        ids, pixels = inputs
        assert not torch.allclose(plain(input_ids=ids, pixel_values=pixels).logits, expected)

    # Built once: a second call returns the same folders without rebuilding them.
    mtime = (Path(model_dir) / FOLDED_WEIGHTS).stat().st_mtime_ns
    assert vllm_loadable(str(tiny_llava), str(projector_adapter)) == (model_dir, adapter_dir)
    assert (Path(model_dir) / FOLDED_WEIGHTS).stat().st_mtime_ns == mtime
    assert not list(prepared_root().glob(".building-*"))


REVISION = "0123456789abcdef0123456789abcdef01234567"


def _hub_snapshot(hf_home: Path, repo_id: str, model: Path, revision: str = REVISION) -> Path:
    """``model``'s files laid out as huggingface_hub caches them: blobs, snapshot links, refs."""
    import hashlib

    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in ``$HF_HOME``, offline (huggingface_hub reads both at import,
    so its constants are patched as well as the environment)."""
    import huggingface_hub.constants as hub

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(hub, "HF_HOME", str(home))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return home


def _sharded(tiny_llava: Path, out: Path, *, projector_alone: bool) -> Path:
    """The tiny LLaVA saved in 200KB shards; ``projector_alone`` moves the projector to a shard
    of its own (then no original shard holds a folded tensor besides that one)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tiny_llava).save_pretrained(
        out, max_shard_size="200KB"
    )
    for f in tiny_llava.iterdir():
        if not (out / f.name).exists() and f.name != "model.safetensors":
            shutil.copyfile(f, out / f.name)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 3
    if projector_alone:
        alone = "model-projector.safetensors"
        moved = {}
        for shard in sorted(set(index["weight_map"].values())):
            weights = load_file(str(out / shard))
            mine = {k: v for k, v in weights.items() if "multi_modal_projector" in k}
            if mine:
                moved.update(mine)
                rest = {k: v for k, v in weights.items() if k not in mine}
                save_file(rest, str(out / shard), metadata={"format": "pt"})
        save_file(moved, str(out / alone), metadata={"format": "pt"})
        index["weight_map"].update({k: alone for k in moved})
        index_path.write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("layout", ["single", "sharded", "projector-alone"])
def test_full_modules_folded_from_a_hub_snapshot(
    layout, tiny_llava, projector_adapter, offline_hub, tmp_path
):
    """A Hub id resolves through the cache (offline); the folded tensors go to one small file."""
    import torch

    if layout == "single":
        source = tiny_llava
    else:
        source = _sharded(tiny_llava, tmp_path / layout, projector_alone=layout != "sharded")
    snapshot = _hub_snapshot(offline_hub, "org/name", source)
    model_dir, adapter_dir = vllm_loadable("org/name", str(projector_adapter))
    model_dir = Path(model_dir)
    assert json.loads((model_dir.parent / "source.json").read_text())["repo_id"] == "org/name"
    inputs = _projector_inputs(tiny_llava)
    expected = _peft_logits(str(tiny_llava), str(projector_adapter), inputs)
    assert torch.equal(_peft_logits(str(model_dir), adapter_dir, inputs), expected)

    # The same snapshot by its commit hash is the same checkpoint: the same prepared folders.
    again = vllm_loadable("org/name", str(projector_adapter), revision=REVISION)
    assert again == (str(model_dir), adapter_dir)
    assert (model_dir / "config.json").is_symlink() and (model_dir / "tokenizer.json").is_symlink()

    held = _listed_files(model_dir)
    assert sorted(held[FOLDED_WEIGHTS]) == sorted(
        f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight")
    )
    folded_size = (model_dir / FOLDED_WEIGHTS).stat().st_size
    projector_bytes = 4 * (128 + 128 * 32 + 128 + 128 * 128)  # float32
    assert projector_bytes < folded_size < projector_bytes + 4096
    blobs = (offline_hub / "hub" / "models--org--name" / "blobs").resolve()
    links = {n for n in held if (model_dir / n).is_symlink()}
    assert all((model_dir / n).resolve().parent == blobs for n in links)
    rewritten = set(held) - links - {FOLDED_WEIGHTS}
    assert not any("multi_modal_projector" in k for n in rewritten for k in held[n])
    if layout == "single":
        assert rewritten == {"rejalign-model.safetensors"}
        assert not (model_dir / "model.safetensors").exists()
        return
    original = json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"]
    if layout == "sharded":
        # Only the shard(s) that held the old projector are rewritten, every other one is a link.
        old = {original[k] for k in held[FOLDED_WEIGHTS]}
        assert rewritten == old and links == set(original.values()) - old and len(links) >= 3
        assert folded_size < min((snapshot / n).stat().st_size for n in old)
    else:
        # The projector had a shard of its own: it is dropped, every other shard is a link.
        assert not rewritten and links == set(original.values()) - {"model-projector.safetensors"}


def test_full_modules_need_a_local_or_cached_base(projector_adapter, offline_hub, tiny_llava):
    with pytest.raises(
        AdapterConfigError,
        match=r"'llava-hf/llava-1.5-7b-hf' is neither a folder nor resolvable.*"
        r"hf download llava-hf/llava-1.5-7b-hf.*--merge",
    ):
        vllm_loadable("llava-hf/llava-1.5-7b-hf", str(projector_adapter))
    _hub_snapshot(offline_hub, "org/name", tiny_llava)
    with pytest.raises(AdapterConfigError, match=r"'org/name' at revision 'v2' is neither"):
        vllm_loadable("org/name", str(projector_adapter), revision="v2")
    with pytest.raises(AdapterConfigError, match=r"'no/such/folder' is neither"):
        vllm_loadable("no/such/folder", str(projector_adapter))


def test_vllm_init_passes_the_revision_to_the_fold(monkeypatch):
    calls = []

    def loadable(pretrained, lora_local_path, revision=None):
        calls.append((pretrained, lora_local_path, revision))
        return "/prepared/model", "/prepared/adapter"

    class VLLM:
        def __init__(self, pretrained, revision=None, lora_local_path=None, max_lora_rank=16):
            self.args = (pretrained, revision, lora_local_path, max_lora_rank)

    module = type(sys)("fake_vllm_causallms")
    module.VLLM = VLLM
    monkeypatch.setattr(vllm_compat, "vllm_loadable", loadable)
    monkeypatch.setattr(vllm_compat, "adapter_rank", lambda path: 16)
    vllm_compat.patch_vllm_init(module)
    made = VLLM("org/name", revision="v2", lora_local_path="/adapter")
    assert calls == [("org/name", "/adapter", "v2")]
    assert made.args == ("/prepared/model", "v2", "/prepared/adapter", 16)


def test_adapter_without_full_modules_is_used_as_it_is(tiny_llava, tmp_path):
    folder = _adapter(tmp_path / "plain", {"r": 8, "modules_to_save": None})
    assert vllm_loadable(str(tiny_llava), folder) == (str(tiny_llava), folder)
    folder = _adapter(tmp_path / "head", {"r": 8, "modules_to_save": ["score"]})
    assert vllm_loadable(str(tiny_llava), folder) == (str(tiny_llava), folder)


def test_full_module_absent_from_the_base_is_named(tmp_path, tiny_llava, projector_adapter):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_llava, base)
    weights = load_file(str(base / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if "multi_modal_projector.linear_2" not in k}
    save_file(weights, str(base / "model.safetensors"))
    with pytest.raises(AdapterConfigError, match=r"linear_2.*matches 0 tensors"):
        vllm_loadable(str(base), str(projector_adapter))
