"""Serving a peft adapter on vLLM: its LoRA rank, and full modules that vLLM's LoRA cannot hold.

``rejalign-train fit`` trains the projector too (as the paper does), so its adapters carry the
projector as a full module (peft's ``modules_to_save``). vLLM's LoRA accepts no such module
(only classification heads), yet lm-eval's ``hf-multimodal`` ``peft=`` applies it. To evaluate the
same model on vLLM, :func:`vllm_loadable` folds the full modules into a copy of the base
checkpoint and strips them from a copy of the adapter: vLLM then serves base+projector as the
model and the language-model LoRA as a LoRA, which computes what peft computes.

The copies live in the cache (``<datasets cache>/rejalign/vllm-adapters/<key>/``), built once per
(base checkpoint, adapter) and atomically; unchanged files are symbolic links, only the weight
file holding the folded module is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Full modules vLLM's LoRA does take (vllm/lora/peft_helper.py): classification heads.
VLLM_FULL_MODULES = ("classifier", "score")
# vLLM 0.32's LoRAConfig.max_lora_rank literal (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LORA_MARKERS = (
    ".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude"
)
_FORMAT = 1  # bump when the layout of a prepared folder changes


class AdapterConfigError(ValueError):
    """An adapter folder cannot be used: the message names the file and field."""


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir).expanduser() / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterConfigError(
            f"lora_local_path={adapter_dir}: {ADAPTER_CONFIG} not found there; expected a peft "
            "adapter folder (as written by peft's save_pretrained or rejalign-train fit)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterConfigError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{path}: expected a JSON object")
    return config


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest LoRA rank in a peft adapter folder (``r`` and any ``rank_pattern`` value)."""
    config = read_adapter_config(adapter_dir)
    path = Path(adapter_dir).expanduser() / ADAPTER_CONFIG
    ranks = [config.get("r")]
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterConfigError(f"{path}: field 'rank_pattern' must be an object")
    ranks += list(pattern.values())
    for value in ranks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AdapterConfigError(
                f"{path}: field 'r'/'rank_pattern' holds {value!r}, expected a positive integer"
            )
    return max(ranks)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that fits ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise AdapterConfigError(
        f"LoRA rank {rank} exceeds the largest max_lora_rank vLLM supports ({VLLM_LORA_RANKS[-1]})"
    )


def full_modules(config: dict, adapter_dir: str | Path) -> list[str]:
    """The adapter's ``modules_to_save`` that vLLM's LoRA cannot load."""
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AdapterConfigError(
            f"{Path(adapter_dir) / ADAPTER_CONFIG}: field 'modules_to_save' must be a list of names"
        )
    return [n for n in names if n not in VLLM_FULL_MODULES]


def _base_weight_files(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AdapterConfigError(f"{index}: unreadable weight map ({exc})") from exc
        return sorted({base / name for name in weight_map.values()})
    single = base / "model.safetensors"
    if single.is_file():
        return [single]
    raise AdapterConfigError(
        f"pretrained={base}: no model.safetensors(.index.json) there; the adapter's full modules "
        "can only be folded into a local safetensors checkpoint"
    )


def _cache_key(base: Path, adapter: Path, weight_files: list[Path]) -> str:
    digest = hashlib.sha256(f"format {_FORMAT}\n{base.resolve()}\n".encode())
    for f in weight_files:
        st = f.stat()
        digest.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        with open(adapter / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def _match(name: str, base_keys: dict[str, Path], adapter: Path) -> str:
    """The base checkpoint's name for a full-module tensor of the adapter.

    Checkpoints name the same tensor with or without a leading ``model.`` (transformers 5's
    layout vs. the legacy llava-hf one), so a name matches when one ends with the other.
    """
    hits = [k for k in base_keys if k == name or name.endswith("." + k) or k.endswith("." + name)]
    if len(hits) != 1:
        raise AdapterConfigError(
            f"{adapter / ADAPTER_WEIGHTS}: tensor {PEFT_PREFIX + name!r} matches "
            f"{len(hits)} tensors of the base checkpoint ({', '.join(hits[:4]) or 'none'}); "
            "cannot fold it into the base model for vLLM"
        )
    return hits[0]


def _link_all(src: Path, dst: Path, skip: set[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name not in skip:
            os.symlink(entry.resolve(), dst / entry.name)


def _build(base: Path, adapter: Path, config: dict, modules: list[str], out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    folded: dict[str, object] = {}
    kept: dict[str, object] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        is_lora = any(marker in key for marker in _LORA_MARKERS)
        if not is_lora and any(name == m or name.startswith(m + ".") for m in modules):
            folded[name] = value
        else:
            kept[key] = value
    if not folded:
        raise AdapterConfigError(
            f"{adapter / ADAPTER_WEIGHTS}: modules_to_save {modules} has no weights in the file"
        )

    weight_files = _base_weight_files(base)
    base_keys: dict[str, Path] = {}
    for f in weight_files:
        with safe_open(str(f), "pt") as fh:
            base_keys.update({k: f for k in fh.keys()})
    targets: dict[Path, dict[str, object]] = {}
    for name, value in folded.items():
        key = _match(name, base_keys, adapter)
        targets.setdefault(base_keys[key], {})[key] = value

    model_dir, adapter_dir = out / "model", out / "adapter"
    _link_all(base, model_dir, skip={f.name for f in targets})
    for f, replacements in targets.items():
        weights = load_file(str(f))
        for key, value in replacements.items():
            if tuple(weights[key].shape) != tuple(value.shape):
                raise AdapterConfigError(
                    f"{adapter / ADAPTER_WEIGHTS}: {key} has shape {tuple(value.shape)}, the base "
                    f"checkpoint's {f.name} has {tuple(weights[key].shape)}"
                )
            weights[key] = value.to(weights[key].dtype).contiguous()
        save_file(weights, str(model_dir / f.name), metadata={"format": "pt"})

    _link_all(adapter, adapter_dir, skip={ADAPTER_CONFIG, ADAPTER_WEIGHTS})
    stripped = {**config, "modules_to_save": None}
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(stripped, indent=2) + "\n")
    save_file(kept, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / "source.json").write_text(
        json.dumps(
            {"pretrained": str(base.resolve()), "adapter": str(adapter.resolve()),
             "folded": sorted(folded)},
            indent=2,
        )
        + "\n"
    )


def prepared_root() -> Path:
    from rejalign_tasks.contracts import cache_root

    return cache_root() / "vllm-adapters"


def vllm_loadable(pretrained: str, lora_local_path: str) -> tuple[str, str]:
    """``(pretrained, lora_local_path)`` that vLLM can load and that compute what peft computes.

    Unchanged when the adapter has no full modules; otherwise the cached folded copies.
    """
    adapter = Path(lora_local_path).expanduser()
    config = read_adapter_config(adapter)
    modules = full_modules(config, adapter)
    if not modules:
        return pretrained, lora_local_path
    base = Path(pretrained).expanduser()
    if not base.is_dir():
        raise AdapterConfigError(
            f"lora_local_path={lora_local_path} trains {modules} as full modules, which vLLM's "
            "LoRA cannot load; folding them into the base model needs a local pretrained folder, "
            f"not {pretrained!r} (download it first, or evaluate the merged model written by "
            "rejalign-train fit --merge)"
        )
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise AdapterConfigError(f"{adapter}: {ADAPTER_WEIGHTS} not found")
    out = prepared_root() / _cache_key(base, adapter, _base_weight_files(base))
    if not (out / "source.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
        try:
            _build(base, adapter, config, modules, tmp)
            try:
                os.rename(tmp, out)
            except OSError:
                if not (out / "source.json").is_file():  # not a concurrent build that won
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("rejalign: folded %s of %s into %s for vLLM", modules, adapter, out)
    return str(out / "model"), str(out / "adapter")
