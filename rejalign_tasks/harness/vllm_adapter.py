"""Serving a peft adapter on vLLM: its LoRA rank, and full modules that vLLM's LoRA cannot hold.

``rejalign-train fit`` trains the projector too (as the paper does), so its adapters carry the
projector as a full module (peft's ``modules_to_save``). vLLM's LoRA accepts no such module
(only classification heads), yet lm-eval's ``hf-multimodal`` ``peft=`` applies it. To evaluate the
same model on vLLM, :func:`vllm_loadable` folds the full modules into a copy of the base
checkpoint and strips them from a copy of the adapter: vLLM then serves base+projector as the
model and the language-model LoRA as a LoRA, which computes what peft computes.

The base checkpoint is a local folder or a Hub id, resolved through the Hugging Face cache
(:func:`resolve_pretrained`: offline when cached, downloaded otherwise). The copies live in the
cache (``<datasets cache>/rejalign/vllm-adapters/<key>/``), built once per (base checkpoint,
adapter) and atomically. The folded tensors go into one extra file (``rejalign-folded.safetensors``)
and a new ``model.safetensors.index.json`` maps them there and every other tensor to its original
shard, a symbolic link.

Why a shard holding the old tensors is still rewritten: the index only chooses *files*. vLLM
(0.32, ``DefaultModelLoader._prepare_weights`` -> ``filter_duplicate_safetensors_files``) keeps the
files named in ``weight_map.values()`` and ``safetensors_weights_iterator`` then yields *every*
tensor of each kept file (``for name in f.keys()``), in natural-sort order of the file names
(``multi_thread_safetensors_weights_iterator``: in completion order); each one is copied into the
parameter, so a name held by two listed files is loaded twice and the last one read wins.
transformers 5 does the same (it merges every tensor of every listed shard). So a shard that also
holds an old value of a folded tensor cannot be linked: it is rewritten without the folded tensors
(a single-file ``model.safetensors`` always is, as ``rejalign-model.safetensors``: transformers
prefers a ``model.safetensors`` to the index), and a shard holding nothing but folded tensors is
dropped. Only the other shards -- all of them when the full modules have shards of their own --
are left as links, so the build costs O(folded modules) plus the shards that share them.
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
FOLDED_WEIGHTS = "rejalign-folded.safetensors"
# Where a base weight file named model.safetensors goes in the prepared folder: transformers takes
# a model.safetensors over the index when a folder has both, and would miss the folded file.
SINGLE_PLACED = "rejalign-model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# What the prepared model folder needs from a Hub repository besides its weights: config,
# generation config, tokenizer, processor and chat template files (and remote code, if any).
HUB_FILES = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py")
_FORMAT = 2  # bump when the layout of a prepared folder changes


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


def _hub_error(pretrained: str, revision: str | None, lora_local_path: str, modules, reason) -> str:
    at = f" at revision {revision!r}" if revision else ""
    return (
        f"lora_local_path={lora_local_path} trains {modules} as full modules, which vLLM's LoRA "
        "cannot load; folding them into the base model needs a local pretrained folder or a Hub "
        f"checkpoint, and pretrained={pretrained!r}{at} is neither a folder nor resolvable "
        f"({reason}); download it first (hf download {pretrained}, or huggingface-cli download "
        f"{pretrained} with an older huggingface_hub), "
        "or evaluate the merged model written by rejalign-train fit --merge"
    )


def resolve_pretrained(
    pretrained: str, lora_local_path: str, modules: list[str], revision: str | None = None
) -> tuple[Path, str | None]:
    """The local folder of ``pretrained`` and its Hub id (``None`` for a local folder).

    A Hub id goes through ``huggingface_hub.snapshot_download``, which answers from the cache
    (offline too, ``HF_HUB_OFFLINE=1``) and downloads what is missing otherwise: first the
    configuration/tokenizer/processor files (:data:`HUB_FILES`), then only the weight files the
    index names (or ``model.safetensors``), so a repository's extra weight formats stay remote.
    """
    base = Path(pretrained).expanduser()
    if base.is_dir():
        return base, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    def fail(reason: str) -> AdapterConfigError:
        message = _hub_error(pretrained, revision, lora_local_path, modules, reason)
        return AdapterConfigError(message)

    try:
        folder = Path(
            snapshot_download(pretrained, revision=revision, allow_patterns=list(HUB_FILES))
        )
        index = folder / SAFE_INDEX
        weights = [SAFE_SINGLE]
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict):
                raise AdapterConfigError(f"{index}: unreadable weight map (no 'weight_map' object)")
            weights = sorted(set(weight_map.values()))
        folder = Path(snapshot_download(pretrained, revision=revision, allow_patterns=weights))
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError, ValueError) as exc:
        if isinstance(exc, AdapterConfigError):
            raise
        lines = str(exc).strip().splitlines()
        raise fail(f"{type(exc).__name__}: {lines[0] if lines else ''}") from exc
    missing = [w for w in weights if not (folder / w).is_file()]
    if missing and (folder / SAFE_INDEX).is_file():
        raise fail(f"its cached snapshot {folder} lacks {', '.join(missing[:4])}")
    return folder, pretrained


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


def _index_metadata(base: Path) -> dict:
    index = base / SAFE_INDEX
    if not index.is_file():
        return {}
    metadata = json.loads(index.read_text(encoding="utf-8")).get("metadata")
    return dict(metadata) if isinstance(metadata, dict) else {}


def _build(
    base: Path, adapter: Path, config: dict, modules: list[str], out: Path, source: dict
) -> None:
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
    keys_of: dict[Path, list[str]] = {}
    for f in weight_files:
        with safe_open(str(f), "pt") as fh:
            keys_of[f] = list(fh.keys())
        base_keys.update({k: f for k in keys_of[f]})
    replaced: dict[str, object] = {}
    for name, value in folded.items():
        key = _match(name, base_keys, adapter)
        f = base_keys[key]
        with safe_open(str(f), "pt") as fh:
            old = fh.get_tensor(key)  # one tensor of the shard, not the shard
        if tuple(old.shape) != tuple(value.shape):
            raise AdapterConfigError(
                f"{adapter / ADAPTER_WEIGHTS}: {key} has shape {tuple(value.shape)}, the base "
                f"checkpoint's {f.name} has {tuple(old.shape)}"
            )
        replaced[key] = value.to(old.dtype).contiguous()

    # Shards holding an old value of a folded tensor are not linked (see the module docstring:
    # vLLM and transformers read every tensor of every file the index names).
    shared = {base_keys[key] for key in replaced}
    model_dir, adapter_dir = out / "model", out / "adapter"
    skip = {f.name for f in weight_files} | {SAFE_SINGLE, SAFE_INDEX, FOLDED_WEIGHTS, SINGLE_PLACED}
    _link_all(base, model_dir, skip=skip)
    save_file(replaced, str(model_dir / FOLDED_WEIGHTS), metadata={"format": "pt"})
    weight_map: dict[str, str] = {}
    rewritten: list[str] = []
    for f in weight_files:
        rest = [k for k in keys_of[f] if k not in replaced]
        if not rest:  # it held folded tensors only: not needed any more
            continue
        placed = SINGLE_PLACED if f.name == SAFE_SINGLE else f.name
        if f in shared:
            with safe_open(str(f), "pt") as fh:
                save_file(
                    {k: fh.get_tensor(k) for k in rest},
                    str(model_dir / placed),
                    metadata=fh.metadata() or {"format": "pt"},
                )
            rewritten.append(placed)
        else:
            os.symlink(f.resolve(), model_dir / placed)
        weight_map.update({k: placed for k in rest})
    weight_map.update({k: FOLDED_WEIGHTS for k in replaced})
    metadata = {**_index_metadata(base), "rejalign_folded": sorted(replaced)}
    (model_dir / SAFE_INDEX).write_text(
        json.dumps({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        + "\n"
    )

    _link_all(adapter, adapter_dir, skip={ADAPTER_CONFIG, ADAPTER_WEIGHTS})
    stripped = {**config, "modules_to_save": None}
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(stripped, indent=2) + "\n")
    save_file(kept, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / "source.json").write_text(
        json.dumps(
            {**source, "pretrained": str(base.resolve()), "adapter": str(adapter.resolve()),
             "folded": sorted(folded), "folded_into": FOLDED_WEIGHTS,
             "rewritten_shards": rewritten},
            indent=2,
        )
        + "\n"
    )


def prepared_root() -> Path:
    from rejalign_tasks.contracts import cache_root

    return cache_root() / "vllm-adapters"


def vllm_loadable(
    pretrained: str, lora_local_path: str, revision: str | None = None
) -> tuple[str, str]:
    """``(pretrained, lora_local_path)`` that vLLM can load and that compute what peft computes.

    Unchanged when the adapter has no full modules; otherwise the cached folded copies.
    ``pretrained`` is a local folder or a Hub id (at ``revision``, lm-eval's model arg).
    """
    adapter = Path(lora_local_path).expanduser()
    config = read_adapter_config(adapter)
    modules = full_modules(config, adapter)
    if not modules:
        return pretrained, lora_local_path
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise AdapterConfigError(f"{adapter}: {ADAPTER_WEIGHTS} not found")
    base, repo_id = resolve_pretrained(pretrained, lora_local_path, modules, revision)
    source = {"repo_id": repo_id, "revision": revision} if repo_id else {}
    out = prepared_root() / _cache_key(base, adapter, _base_weight_files(base))
    if not (out / "source.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
        try:
            _build(base, adapter, config, modules, tmp, source)
            try:
                os.rename(tmp, out)
            except OSError:
                if not (out / "source.json").is_file():  # not a concurrent build that won
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("rejalign: folded %s of %s into %s for vLLM", modules, adapter, out)
    return str(out / "model"), str(out / "adapter")
