"""``rejalign-train fit`` on the tiny random LLaVA: config, output, resume, bad input.

Distributed runs (DDP, FSDP, DeepSpeed) are in test_fit_distributed.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from rejalign_tasks.console import UsageError
from rejalign_tasks.contracts import sha256_file
from rejalign_train.chat import ChatRenderer
from rejalign_train.cli import main as cli_main
from rejalign_train.collator import VisionChatCollator
from rejalign_train.config import parse_fit_args
from rejalign_train.dataset import prepare_samples
from rejalign_train.fit import FitError, incomplete_dir
from rejalign_train.manifest import MANIFEST_NAME, is_finished, read_manifest
from rejalign_train.mixing import REFUSAL_SENTENCE
from rejalign_train.model_setup import lora_target_modules
from rejalign_train.records import iter_records
from rejalign_train.synthetic import shape_records, write_jsonl

# Small and fast: a few steps of the real recipe (LoRA r=128 etc.), on one thread (the CI
# machine's cores are shared; oversubscribed BLAS threads are many times slower).
FAST = [
    "--per-device-train-batch-size", "4",
    "--gradient-accumulation-steps", "1",
    "--dataloader-num-workers", "0",
    "--gradient-checkpointing", "false",
    "--learning-rate", "1e-3",
    "--disable-tqdm", "true",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """16 benign shape records, a quarter of them refusals, as LLaVA-format JSONL."""
    root = tmp_path_factory.mktemp("shapes")
    records = shape_records(root / "images", 16, seed=3)
    for r in records[::4]:
        r["conversations"][1]["value"] = REFUSAL_SENTENCE
    return write_jsonl(root / "mixed.jsonl", records)


def fit_cli(*args: str) -> int:
    return cli_main(["fit", *args])


def test_defaults_are_the_paper_recipe(tmp_path):
    model, data, train = parse_fit_args(["--model", "m", "--data", "d.jsonl", "--output-dir", "o"])
    assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (128, 256, 0.05)
    assert (model.train_projector, model.projector_lr, model.lora_target_modules) == (
        True,
        2e-5,
        None,
    )
    assert (train.learning_rate, train.num_train_epochs, train.warmup_steps) == (2e-4, 3.0, 0.03)
    assert (train.lr_scheduler_type.value, train.weight_decay) == ("cosine", 0.0)
    assert (train.per_device_train_batch_size, train.gradient_accumulation_steps) == (16, 2)
    assert train.gradient_checkpointing and train.gradient_checkpointing_kwargs == {
        "use_reentrant": False
    }
    assert train.bf16 is False  # no bf16 hardware here; True on a bf16 GPU
    assert (data.max_length, data.overlong, data.refusal_eos) == (2048, "skip", "mask")
    assert data.refusal_sentence == REFUSAL_SENTENCE

    # A YAML file, then flags that override it (dashes or underscores in keys alike).
    config = tmp_path / "fit.yaml"
    config.write_text("model: m\ndata: d.jsonl\noutput_dir: o\nlora-r: 16\nrefusal_eos: train\n")
    model, data, train = parse_fit_args([str(config), "--lora-r", "32"])
    assert (model.lora_r, data.refusal_eos, train.output_dir) == (32, "train", "o")
    (tmp_path / "bad.json").write_text(json.dumps({"model": "m", "lora_rank": 4}))
    with pytest.raises(UsageError, match="unknown option.*lora_rank"):
        parse_fit_args([str(tmp_path / "bad.json")])


def test_lora_targets_only_the_language_model(tiny_llava):
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    targets = lora_target_modules(model)
    assert len(targets) == 14  # 2 layers x q,k,v,o,gate,up,down
    assert all(t.startswith("model.language_model.layers.") for t in targets)
    # CLIP's attention has q_proj too: naming a layer never reaches into the vision tower.
    assert lora_target_modules(model, ["q_proj"]) == [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.1.self_attn.q_proj",
    ]
    with pytest.raises(FitError, match="out_proj.*not linear layers of the language model"):
        lora_target_modules(model, ["out_proj"])


def test_fit_writes_a_standard_adapter_with_manifest_and_merged_weights(
    tiny_llava, shapes_data, tmp_path, capsys
):
    out = tmp_path / "adapter"
    args = ["--model", str(tiny_llava), "--data", str(shapes_data), "--output-dir", str(out)]
    assert fit_cli(*args, *FAST, "--max-steps", "3", "--merge") == 0

    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", MANIFEST_NAME} <= files
    assert {"chat_template.jinja", "tokenizer.json", "processor_config.json", "merged"} <= files
    assert not incomplete_dir(out).exists()
    assert (
        AutoProcessor.from_pretrained(out).chat_template
        == AutoProcessor.from_pretrained(tiny_llava).chat_template
    )

    # Standard peft names; LoRA on the language model only; the projector saved whole.
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (128, 256, 0.05)
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    matched = [n for n, _ in base.named_modules() if re.fullmatch(config["target_modules"], n)]
    assert matched == lora_target_modules(base)
    assert config["modules_to_save"] == ["model.multi_modal_projector"]
    keys = load_file(out / "adapter_model.safetensors").keys()
    lora = {k for k in keys if ".lora_" in k}
    assert len(lora) == 28 and all(
        k.startswith("base_model.model.model.language_model.layers.") for k in lora
    )
    assert set(keys) - lora == {
        f"base_model.model.model.multi_modal_projector.linear_{i}.{p}"
        for i in (1, 2)
        for p in ("weight", "bias")
    }

    manifest = read_manifest(out)
    assert is_finished(out) and manifest["complete"] is True
    assert manifest["data"]["sha256"] == sha256_file(shapes_data)
    assert (manifest["data"]["used"], manifest["data"]["refusal_samples"]) == (16, 4)
    assert manifest["data"]["refusal_fraction"] == 0.25
    assert manifest["training"]["global_step"] == 3 and manifest["training"]["resumed_from"] is None
    assert manifest["hyperparameters"]["model"]["lora_r"] == 128
    assert manifest["hyperparameters"]["data"]["refusal_eos"] == "mask"
    assert manifest["hyperparameters"]["training"]["output_dir"] == str(out.resolve())
    assert {"torch", "transformers", "peft", "accelerate"} <= set(manifest["versions"])
    assert manifest["merged"] == "merged"

    # The merged weights compute what base + adapter computes.
    processor = AutoProcessor.from_pretrained(tiny_llava)
    samples, _ = prepare_samples(
        iter_records(shapes_data),
        processor,
        ChatRenderer(processor),
        source=str(shapes_data),
        image_root=shapes_data.parent,
        max_length=512,
        refusal_sentence=REFUSAL_SENTENCE,
        progress=False,
    )
    batch = VisionChatCollator(processor)(samples[:4])
    batch.pop("labels")
    adapted = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        expected, got = adapted(**batch).logits, merged(**batch).logits
    plain = AutoModelForImageTextToText.from_pretrained(tiny_llava).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(**batch).logits, expected, atol=1e-3)  # it did train
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # A finished output is never overwritten by accident; --resume on it is a no-op.
    capsys.readouterr()
    assert fit_cli(*args, *FAST, "--max-steps", "3") == 2
    assert "already holds a finished adapter" in capsys.readouterr().err
    assert fit_cli(*args, *FAST, "--max-steps", "3", "--resume") == 0
    assert read_manifest(out) == manifest


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from transformers import TrainerCallback
    from rejalign_train.config import parse_fit_args
    from rejalign_train.fit import fit

    class KillAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)
    fit(*parse_fit_args(sys.argv[1:]), callbacks=[KillAfterCheckpoint()])
    """
)


def test_kill_mid_training_then_resume(tiny_llava, shapes_data, tmp_path, capsys):
    out = tmp_path / "adapter"
    args = [
        "--model", str(tiny_llava), "--data", str(shapes_data), "--output-dir", str(out),
        *FAST, "--max-steps", "6", "--save-steps", "2", "--save-total-limit", "1",
    ]  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *args],
        env={**ENV, "KILL_AT": "4"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    work = incomplete_dir(out)
    # Nothing looks finished: no output folder, and the work folder has no manifest.
    assert not out.exists() and not is_finished(out) and not is_finished(work)
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4"
    ]

    assert fit_cli(*args) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert fit_cli(*args, "--learning-rate", "5e-4", "--resume") == 2
    assert "different learning_rate" in capsys.readouterr().err

    assert fit_cli(*args, "--resume") == 0
    manifest = read_manifest(out)
    assert manifest["training"]["resumed_from"] == "checkpoint-4"
    assert manifest["training"]["global_step"] == 6
    assert not work.exists()

    # Resuming lands where an uninterrupted run lands.
    reference = tmp_path / "reference"
    assert fit_cli(*[a if a != str(out) else str(reference) for a in args]) == 0
    resumed = load_file(out / "adapter_model.safetensors")
    straight = load_file(reference / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)


def _write_raw(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _shape(rid: str, image: str = "images/shape_0.png", human: str = "<image>\nWhat is it?"):
    return {
        "id": rid,
        "image": image,
        "conversations": [
            {"from": "human", "value": human},
            {"from": "gpt", "value": "A shape."},
        ],
    }


BAD_INPUTS = {
    "missing image": (
        [_shape("ok"), _shape("x1", image="images/missing.png")],
        r"record 1 \(id 'x1'\), field 'images': image file \S*images/missing\.png not found",
    ),
    "no assistant turn": (
        [{"id": "q", "image": "images/shape_0.png",
          "conversations": [{"from": "human", "value": "<image>\nHi"}]}],
        r"record 0 \(id 'q'\), field 'conversations': no assistant turn",
    ),
    "image count": (
        [_shape("two", human="<image>\n<image>\nWhat is it?")],
        r"record 0 \(id 'two'\), field 'images': 2 <image> placeholder\(s\) .* but 1 image\(s\)",
    ),
    "empty data": ([], r"empty file: no records"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_error_and_leaves_nothing(
    case, tiny_llava, shapes_data, tmp_path, capsys
):
    rows, pattern = BAD_INPUTS[case]
    data = _write_raw(shapes_data.parent / f"bad-{case.replace(' ', '-')}.jsonl", rows)
    out = tmp_path / "adapter"
    assert fit_cli("--model", str(tiny_llava), "--data", str(data), "--output-dir", str(out)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"rejalign-train fit: error: {data}: ")
    assert re.search(pattern, errors[0]), err
    assert "Traceback" not in err
    assert not out.exists() and not incomplete_dir(out).exists()


def test_overlong_and_missing_data_and_fraction_errors(tiny_llava, shapes_data, tmp_path, capsys):
    out = tmp_path / "adapter"
    base = ["--model", str(tiny_llava), "--output-dir", str(out)]
    assert (
        fit_cli(*base, "--data", str(shapes_data), "--max-length", "20", "--overlong", "error") == 2
    )
    assert re.search(
        r"record 0 \(id 'shape_0'\): \d+ tokens .* exceed max_length 20", capsys.readouterr().err
    )
    assert fit_cli(*base, "--data", str(tmp_path / "nope.jsonl")) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
    assert not out.exists() and not incomplete_dir(out).exists()
    # The refusal fraction is the mix step's: outside [0, 1] it is refused there, by name.
    mix = [
        "mix",
        "--refusal_source",
        str(shapes_data),
        "--total",
        "8",
        "--output",
        str(tmp_path / "m.jsonl"),
    ]
    assert cli_main([*mix, "--refusal_fraction", "1.5"]) == 2
    assert "--refusal_fraction must be within [0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "m.jsonl").exists()


def test_resume_skips_and_removes_a_checkpoint_cut_short(tmp_path):
    """A kill during a checkpoint save leaves a folder without (a readable) trainer_state.json."""
    from rejalign_train.fit import last_complete_checkpoint, trainer_checkpoints

    for step, state in ((2, "{}"), (4, "{}"), (6, None), (8, '{"trunc')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    complete, partial = trainer_checkpoints(tmp_path)
    assert [p.name for p in complete] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in partial] == ["checkpoint-6", "checkpoint-8"]
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(tmp_path / "nothing-here") is None
