"""``rejalign-train fit`` as the paper ran it: sharded (FSDP, DeepSpeed ZeRO-2/3) under torchrun.

Two CPU processes over gloo stand in for the GPUs. Every distributed run must write the adapter
a single-process run writes: the same files, the same tensor names, shapes and dtypes in
``adapter_model.safetensors``, the same ``adapter_config.json``, a finished rejalign manifest, and
it must load with peft and run. FSDP and ZeRO-2 must also land on the very weights DDP lands on
(ZeRO-3 initialises LoRA under ``zero.Init``, with other random numbers, so only its format and its
training are compared).

accelerate turns FSDP on only with accelerators (on CPUs it silently keeps DDP), although torch's
FSDP2 itself runs on CPUs: the launcher below lets it through, so that these tests reach the same
FSDP code (wrapping, sharded optimizer, state-dict gathering) that a GPU run reaches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from rejalign_train.chat import ChatRenderer
from rejalign_train.cli import main as cli_main
from rejalign_train.collator import VisionChatCollator
from rejalign_train.dataset import prepare_samples
from rejalign_train.fit import incomplete_dir
from rejalign_train.manifest import MANIFEST_NAME, is_finished, read_manifest
from rejalign_train.mixing import REFUSAL_SENTENCE
from rejalign_train.records import iter_records
from rejalign_train.synthetic import shape_records, write_jsonl

FAST = [
    "--per-device-train-batch-size", "4",
    "--gradient-accumulation-steps", "1",
    "--dataloader-num-workers", "0",
    "--gradient-checkpointing", "false",
    "--learning-rate", "1e-3",
    "--disable-tqdm", "true",
    "--max-steps", "2",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

LAUNCHER = textwrap.dedent(
    """
    import sys

    import torch
    from accelerate import state as acc_state
    from accelerate.utils import DistributedType

    _init = acc_state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        # What accelerate does for a multi-GPU FSDP run, on CPUs (where it keeps MULTI_CPU/DDP).
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            acc_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    acc_state.AcceleratorState.__init__ = init
    if "--deepspeed" in sys.argv:
        import deepspeed.ops

        # No JIT-built CPU ops: the shared-memory all-reduce takes minutes to compile on 2 cores,
        # and without it DeepSpeed uses gloo's.
        deepspeed.ops.__compatible_ops__ = {}
    torch.set_num_threads(1)
    from rejalign_train.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)

ZERO = {
    stage: {
        "zero_optimization": {"stage": stage},  # peft + ZeRO-3: gathered without the 16-bit flag
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
    }
    for stage in (2, 3)
}

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    records = shape_records(root / "images", 16, seed=3)
    for r in records[::4]:
        r["conversations"][1]["value"] = REFUSAL_SENTENCE
    return write_jsonl(root / "mixed.jsonl", records)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launcher") / "fit_launcher.py"
    path.write_text(LAUNCHER)
    return path


def torchrun(launcher: Path | None, tiny_llava: Path, data: Path, out: Path, *extra: str):
    """``torchrun ... fit``: through ``launcher``, or (None) the plain ``rejalign_train.cli``."""
    entry = [str(launcher)] if launcher else ["-m", "rejalign_train.cli"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        *entry, "fit", "--model", str(tiny_llava), "--data", str(data),
        "--output-dir", str(out), *FAST, *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out.resolve())  # printed once, by rank 0
    return proc


@pytest.fixture(scope="module")
def single(tiny_llava, shapes_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "adapter"
    args = ["fit", "--model", str(tiny_llava), "--data", str(shapes_data), "--output-dir", str(out)]
    assert cli_main([*args, *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def ddp(tiny_llava, shapes_data, tmp_path_factory) -> Path:
    """The plain command under torchrun: DDP over gloo."""
    out = tmp_path_factory.mktemp("ddp") / "adapter"
    torchrun(None, tiny_llava, shapes_data, out)
    return out


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def assert_same_format(got: Path, reference: Path) -> dict[str, torch.Tensor]:
    """``got`` holds what a single-process run writes; return its tensors."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert not incomplete_dir(got).exists()
    tensors, expected = adapter_tensors(got), adapter_tensors(reference)
    assert sorted(tensors) == sorted(expected)
    for name, value in expected.items():
        assert (tensors[name].shape, tensors[name].dtype) == (value.shape, value.dtype), name
    config = json.loads((got / "adapter_config.json").read_text())
    assert config == json.loads((reference / "adapter_config.json").read_text())
    assert is_finished(got) and (got / MANIFEST_NAME).is_file()
    manifest = read_manifest(got)
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["global_step"] == 2
    # It trained: LoRA B starts at zero.
    assert all(v.abs().max() > 0 for k, v in tensors.items() if ".lora_B." in k)
    return tensors


def assert_same_weights(got: Path, reference: Path, names: str = "") -> None:
    tensors, expected = adapter_tensors(got), adapter_tensors(reference)
    for name in expected:
        if names in name:
            torch.testing.assert_close(tensors[name], expected[name], rtol=1e-5, atol=1e-6)


def assert_loads_and_runs(tiny_llava: Path, adapter: Path, data: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_llava)
    samples, _ = prepare_samples(
        iter_records(data),
        processor,
        ChatRenderer(processor),
        source=str(data),
        image_root=data.parent,
        max_length=512,
        refusal_sentence=REFUSAL_SENTENCE,
        progress=False,
    )
    batch = VisionChatCollator(processor)(samples[:2])
    batch.pop("labels")
    plain = AutoModelForImageTextToText.from_pretrained(tiny_llava).eval()
    with torch.no_grad():
        before = plain(**batch).logits
    adapted = PeftModel.from_pretrained(plain, adapter).eval()
    with torch.no_grad():
        after = adapted(**batch).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after, atol=1e-4)


def test_same_fit_under_torchrun_ddp(ddp, single):
    manifest = read_manifest(ddp)
    assert manifest["training"]["distributed"] == {"type": "MULTI_CPU", "backend": "gloo"}
    # 2 steps x 2 processes x 4 samples = 16 samples = one epoch.
    assert manifest["training"]["global_step"] == 2 and manifest["training"]["epochs"] == 1.0
    assert_same_format(ddp, single)


FSDP_CASES = {
    # The Trainer's legacy string; the decoder/encoder layers to wrap are found by fit.
    "full_shard auto_wrap": (["--fsdp", "full_shard auto_wrap"], None),
    # A JSON config: sharded checkpoints (the Trainer then saves no weights in save_model; fit
    # gathers them itself), a checkpoint at every step, and gradient checkpointing.
    "fsdp_config sharded": (
        ["--fsdp", "--save-steps", "1", "--gradient-checkpointing", "true"],
        {"state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True},
    ),
}


@pytest.mark.parametrize("case", list(FSDP_CASES))
def test_fsdp_writes_the_single_process_adapter(
    case, launcher, tiny_llava, shapes_data, single, ddp, tmp_path, request
):
    flags, config = FSDP_CASES[case]
    if config is not None:
        (tmp_path / "fsdp.json").write_text(json.dumps(config))
        flags = [*flags, "--fsdp_config", str(tmp_path / "fsdp.json")]
    out = tmp_path / "adapter"
    proc = torchrun(launcher, tiny_llava, shapes_data, out, *flags)
    assert "wrapping CLIPEncoderLayer,CLIPVisionEmbeddings,LlamaDecoderLayer" in proc.stderr
    distributed = read_manifest(out)["training"]["distributed"]
    assert (distributed["type"], distributed["fsdp_version"]) == ("FSDP", 2)
    assert_same_format(out, single)
    assert_same_weights(out, ddp)
    assert_loads_and_runs(tiny_llava, out, shapes_data)
    if case == "full_shard auto_wrap":  # and through lm-eval's peft=, as the paper evaluated it
        request.getfixturevalue("data_dir")
        args = [
            "--model", "hf-multimodal", "--apply_chat_template",
            "--model_args", f"pretrained={tiny_llava},dtype=float32,peft={out}",
            "--tasks", "rejalign_figstep_tiny", "--device", "cpu",
            "--gen_kwargs", "max_gen_toks=4", "--limit", "2", "--batch_size", "2",
        ]  # fmt: skip
        proc, results, _ = request.getfixturevalue("lm_eval_cli")(args, tmp_path / "lm_eval")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert results["config"]["model_args"]["peft"] == str(out)
        assert results["results"]["rejalign_figstep_tiny"]["sample_len"] == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_writes_the_single_process_adapter(
    stage, launcher, tiny_llava, shapes_data, single, ddp, tmp_path
):
    if importlib.util.find_spec("deepspeed") is None:  # a skip would prove nothing
        pytest.fail("deepspeed is not installed: pip install -e '.[deepspeed]' (DS_BUILD_OPS=0)")
    (tmp_path / "ds.json").write_text(json.dumps(ZERO[stage]))
    out = tmp_path / "adapter"
    torchrun(launcher, tiny_llava, shapes_data, out, "--deepspeed", str(tmp_path / "ds.json"))
    distributed = read_manifest(out)["training"]["distributed"]
    assert (distributed["type"], distributed["zero_stage"]) == ("DEEPSPEED", stage)
    assert_same_format(out, single)
    # ZeRO-3 builds LoRA A under zero.Init from other random numbers; B and the projector start
    # from the same values (zeros, the base projector) and take the same steps.
    assert_same_weights(out, ddp, names="" if stage == 2 else "multi_modal_projector")
    assert_loads_and_runs(tiny_llava, out, shapes_data)


def test_an_incomplete_adapter_is_never_finalised(tmp_path):
    """What a ZeRO-3 run without gathering (or a trainer that saved nothing) leaves is refused."""
    from safetensors.torch import save_file

    from rejalign_train.fit import FitError, check_adapter

    with pytest.raises(FitError, match="saved no adapter_model.safetensors or adapter_config"):
        check_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    name = "base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight"
    save_file({name: torch.zeros(0)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(FitError, match="incomplete adapter .empty tensors .*lora_A"):
        check_adapter(tmp_path)
    save_file({name: torch.zeros(4, 8)}, tmp_path / "adapter_model.safetensors")
    check_adapter(tmp_path)
