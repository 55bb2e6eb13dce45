"""lm-eval output folders: find the results and per-sample logs, group them by model, check them.

``lm_eval --output_path OUT --log_samples`` (lm-eval 0.4.13) writes, for every run,
``OUT/<model name sanitised>/results_<ts>.json`` and one ``samples_<task>_<ts>.jsonl`` per task of
that run, all with the same ``<ts>`` (with ``--output_path some.json`` the results file is
``some_<ts>.json`` and the samples lie beside it). The folder is named after ``peft=`` or
``pretrained=`` but not vLLM's ``lora_local_path=``, so one folder can hold several models, and a
model evaluated in several runs (image and text-only tasks cannot share an hf-multimodal run) has
several results files. Runs are therefore grouped by the model they evaluated (backend and
``model_args``, less the resource-only arguments in :data:`RESOURCE_ARGS`), never by folder.

Nothing is taken on trust: every number a report shows is recomputed from the per-sample log and
must equal the results file; a missing log, a missing metric or a count that disagrees is an error
that names the file, the task and what is missing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rejalign_tasks.benchmarks.data import DataFormatError, read_json
from rejalign_tasks.benchmarks.metrics import mean_skip_none
from rejalign_tasks.contracts import MANIFEST_NAME
from rejalign_tasks.report.errors import ReportInputError
from rejalign_tasks.report.judged import attach_judged, merge_judged_samples
from rejalign_tasks.report.manifests import (
    find_manifest,
    manifest_refusal_fraction,
    refusal_fraction_source,
)
from rejalign_tasks.report.samples import read_samples

# model_args that change how a model runs, not what it answers: they do not split a model's runs
# into separate rows. Anything else that differs (dtype, chat template, adapter...) does.
RESOURCE_ARGS = frozenset(
    {
        "batch_size",
        "max_batch_size",
        "device",
        "device_map",
        "parallelize",
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "data_parallel_size",
        "max_model_len",
        "max_num_seqs",
        "enforce_eager",
        "max_lora_rank",
        "max_images",
        "swap_space",
        "trust_remote_code",
    }
)
ADAPTER_ARGS = ("peft", "lora_local_path")  # hf-multimodal / vllm-vlm

_TS = re.compile(r"_(\d{4}-\d{2}-\d{2}T[0-9.\-]+)\.json$")
_RESULTS_KEYS = ("results", "configs", "config")


@dataclass
class TaskRun:
    """One task of one lm-eval run: its aggregated metrics and its per-sample log."""

    task: str
    results_file: Path
    samples_file: Path
    timestamp: str
    metrics: dict[str, Any]  # results["results"][task]
    config: dict[str, Any]  # results["configs"][task]
    n_original: int | None
    n_effective: int | None
    judged: dict[str, Path] = field(default_factory=dict)  # judge -> judged samples copy
    _samples: list[dict] | None = field(default=None, repr=False)

    @property
    def limited(self) -> bool:
        """Run with ``--limit`` on fewer prompts than the task has."""
        return (
            self.n_original is not None
            and self.n_effective is not None
            and self.n_effective < self.n_original
        )

    def samples(self, filter_name: str = "none") -> list[dict]:
        """The per-sample log lines of one filter, checked for count and unique doc ids."""
        if self._samples is None:
            self._samples = read_samples(self.samples_file)
            merge_judged_samples(self, self._samples)
        lines = [s for s in self._samples if s.get("filter", "none") == filter_name]
        if not lines:
            filters = sorted({str(s.get("filter")) for s in self._samples})
            raise ReportInputError(
                f"{self.samples_file}: no samples with filter {filter_name!r} "
                f"(filters present: {', '.join(filters) or 'none'})"
            )
        seen: set[int] = set()
        for s in lines:
            if s["doc_id"] in seen:
                raise ReportInputError(
                    f"{self.samples_file}: doc_id {s['doc_id']} appears twice for filter "
                    f"{filter_name!r}; a samples log must hold one run"
                )
            seen.add(s["doc_id"])
        if self.n_effective is not None and len(lines) != self.n_effective:
            raise ReportInputError(
                f"{self.samples_file}: {len(lines)} samples for filter {filter_name!r}, but "
                f"{self.results_file.name} says task {self.task!r} ran on {self.n_effective} "
                "(partial or mismatched log)"
            )
        return lines

    def value(self, metric: str, filter_name: str = "none") -> float:
        """The aggregated metric from the results file (NaN where no sample had it)."""
        key = f"{metric},{filter_name}"
        if key not in self.metrics:
            names = sorted(k for k in self.metrics if "," in k and "_stderr," not in k)
            raise ReportInputError(
                f"{self.results_file}: task {self.task!r} has no metric {key!r} "
                f"(it has: {', '.join(names) or 'none'})"
            )
        value = self.metrics[key]
        if value is None or isinstance(value, str):
            return math.nan
        return float(value)

    def stderr(self, metric: str, filter_name: str = "none") -> float | None:
        value = self.metrics.get(f"{metric}_stderr,{filter_name}")
        return float(value) if isinstance(value, (int, float)) else None

    def per_sample(self, metric: str, filter_name: str = "none") -> dict[int, float | None]:
        """doc_id -> the sample's value of ``metric`` (``None`` where it does not apply)."""
        out: dict[int, float | None] = {}
        for s in self.samples(filter_name):
            if metric not in s:
                raise ReportInputError(
                    f"{self.samples_file}: doc_id {s['doc_id']} has no per-sample value for "
                    f"metric {metric!r}"
                )
            v = s[metric]
            if v is not None and not isinstance(v, (int, float)):
                raise ReportInputError(
                    f"{self.samples_file}: doc_id {s['doc_id']}, metric {metric!r}: "
                    f"value {v!r} is not a number"
                )
            out[s["doc_id"]] = None if v is None else float(v)
        return out

    def checked_value(self, metric: str, filter_name: str = "none") -> tuple[float, int]:
        """The results file's value, verified against the per-sample log; also the sample count.

        lm-eval's ``mean`` and rejalign's ``mean_skip_none`` both equal the mean over the samples
        that carry a value, so that is what is recomputed.
        """
        reported = self.value(metric, filter_name)
        values = list(self.per_sample(metric, filter_name).values())
        recomputed = mean_skip_none(values)
        n = sum(v is not None for v in values)
        same = (math.isnan(reported) and math.isnan(recomputed)) or math.isclose(
            reported, recomputed, rel_tol=1e-9, abs_tol=1e-12
        )
        if not same:
            raise ReportInputError(
                f"{self.results_file}: task {self.task!r}, metric {metric!r} is {reported!r}, but "
                f"the {n} samples in {self.samples_file.name} give {recomputed!r} "
                f"(aggregation {self.aggregation(metric)!r}); results and log disagree"
            )
        return reported, n

    def aggregation(self, metric: str) -> str:
        for entry in self.config.get("metric_list") or []:
            if entry.get("metric") == metric:
                agg = str(entry.get("aggregation", "?"))
                return agg.split("(")[0].removeprefix("def ").strip()
        return "?"


@dataclass
class ModelRuns:
    """Every task one model (backend, model_args, adapter) was evaluated on, across runs."""

    label: str
    backend: str
    model_args: dict[str, Any]
    tasks: dict[str, TaskRun] = field(default_factory=dict)
    superseded: list[TaskRun] = field(default_factory=list)  # older runs of the same task
    manifest: dict[str, Any] | None = None
    manifest_path: Path | None = None
    manifest_note: str | None = None  # why no manifest was found, for an adapter
    explicit_label: bool = False

    @property
    def pretrained(self) -> str:
        return str(self.model_args.get("pretrained") or self.model_args.get("model") or "?")

    @property
    def adapter(self) -> str | None:
        for key in ADAPTER_ARGS:
            if self.model_args.get(key):
                return str(self.model_args[key])
        return None

    @property
    def limited(self) -> bool:
        return any(t.limited for t in self.tasks.values())

    @property
    def refusal_fraction(self) -> float | None:
        """The adapter's training refusal fraction, from its manifest (None for a base model)."""
        if self.manifest is None:
            return None
        return manifest_refusal_fraction(self.manifest, self.manifest_path)

    @property
    def refusal_fraction_key(self) -> str | None:
        """Which manifest key(s) the refusal fraction was read from."""
        if self.manifest is None:
            return None
        found = refusal_fraction_source(self.manifest, self.manifest_path)
        return None if found is None else found[1]


def parse_model_args(value: Any) -> dict[str, Any]:
    """model_args as lm-eval logs them: a dict (0.4.13) or a ``k=v,k=v`` string (older)."""
    if isinstance(value, dict):
        return dict(value)
    if value is None:
        return {}
    if isinstance(value, str):
        from lm_eval.utils import simple_parse_args_string

        return simple_parse_args_string(value)
    raise ReportInputError(f"model_args {value!r}: expected a dict or a k=v,... string")


def identity(backend: str, model_args: dict[str, Any]) -> tuple:
    """What makes two runs the same model for the report."""
    kept = {k: str(v) for k, v in model_args.items() if k not in RESOURCE_ARGS}
    for key in ADAPTER_ARGS:  # a trailing slash does not make another adapter
        if key in kept:
            kept[key] = kept[key].rstrip("/")
    return backend, tuple(sorted(kept.items()))


def find_results_files(path: Path) -> list[Path]:
    """The lm-eval results files at or under ``path``."""
    if not path.exists():
        raise ReportInputError(f"{path}: no such file or folder")
    if path.is_file():
        if not _TS.search(path.name):
            raise ReportInputError(
                f"{path}: not an lm-eval results file (expected results_<timestamp>.json)"
            )
        return [path]
    files = sorted(p for p in path.rglob("results_*.json") if _TS.search(p.name))
    if not files:
        raise ReportInputError(
            f"{path}: no lm-eval results file (results_<timestamp>.json) under it; run lm_eval "
            f"with --output_path {path} --log_samples"
        )
    return files


def load_results_file(
    path: Path, judged: bool = True
) -> tuple[str, dict[str, Any], list[TaskRun]]:
    """Read one results file; check it and that every task's per-sample log is beside it.

    ``judged``: also merge the ``rejalign-judge`` metrics beside it (:mod:`.judged`)."""
    try:
        data = read_json(path)
    except DataFormatError as exc:
        raise ReportInputError(str(exc)) from exc
    if not isinstance(data, dict):
        raise ReportInputError(f"{path}: not an lm-eval results file (top level is not an object)")
    missing = [k for k in _RESULTS_KEYS if k not in data]
    if missing:
        raise ReportInputError(
            f"{path}: not an lm-eval results file; missing key(s) {', '.join(map(repr, missing))}"
        )
    config = data["config"] or {}
    backend = str(config.get("model") or data.get("model_source") or "?")
    model_args = parse_model_args(config.get("model_args"))
    ts = _TS.search(path.name).group(1)
    n_samples = data.get("n-samples") or {}
    runs = []
    tasks = list(data["configs"])
    if not tasks:
        raise ReportInputError(f"{path}: the results file lists no task under 'configs'")
    for task in tasks:
        if task not in data["results"]:
            raise ReportInputError(f"{path}: task {task!r} is configured but has no results")
        samples_file = path.parent / f"samples_{task}_{ts}.jsonl"
        if not samples_file.is_file():
            raise ReportInputError(
                f"{path}: the per-sample log of task {task!r} is missing: expected "
                f"{samples_file.name} beside it (run lm_eval with --log_samples; the report "
                "checks every number against these logs)"
            )
        counts = n_samples.get(task) or {}
        runs.append(
            TaskRun(
                task=task,
                results_file=path,
                samples_file=samples_file,
                timestamp=ts,
                metrics=data["results"][task],
                config=data["configs"][task] or {},
                n_original=counts.get("original"),
                n_effective=counts.get("effective"),
            )
        )
    if judged:
        attach_judged(runs)
    return backend, model_args, runs


def parse_input(spec: str) -> tuple[str | None, Path]:
    """``LABEL=PATH`` or ``PATH``."""
    if "=" in spec and not Path(spec).exists():
        label, _, path = spec.partition("=")
        if not label.strip():
            raise ReportInputError(f"{spec!r}: empty label before '='")
        return label.strip(), Path(path)
    return None, Path(spec)


def load_models(inputs: Sequence[str], adapter_roots: Iterable[Path] = ()) -> list[ModelRuns]:
    """Group every run under ``inputs`` (``PATH`` or ``LABEL=PATH``) into one entry per model.

    ``LABEL=PATH`` names the one model evaluated under PATH; it is an error if PATH holds runs of
    models with different base weights or adapters. Where a task was run more than once for a
    model, the latest run counts and the older ones are listed in ``superseded``.
    """
    if not inputs:
        raise ReportInputError("no input folder given")
    models: dict[tuple, ModelRuns] = {}
    roots: dict[tuple, Path] = {}
    for spec in inputs:
        label, path = parse_input(spec)
        found: dict[tuple, list[tuple[str, dict, list[TaskRun]]]] = {}
        for file in find_results_files(path):
            backend, model_args, runs = load_results_file(file)
            found.setdefault(identity(backend, model_args), []).append((backend, model_args, runs))
        if label is not None:
            cores = {(_core(a)) for group in found.values() for _, a, _ in group}
            if len(cores) > 1:
                listed = "; ".join(f"pretrained={p}, adapter={a}" for p, a in sorted(cores))
                raise ReportInputError(
                    f"{spec}: the label {label!r} must name one model, but {path} holds runs of "
                    f"{len(cores)}: {listed}"
                )
            merged = [item for group in found.values() for item in group]
            first_key = next(iter(found))
            found = {("label", label, first_key): merged}
        for key, group in found.items():
            backend, model_args, _ = group[0]
            if key not in models:
                models[key] = ModelRuns(
                    label=label or "",
                    backend=backend,
                    model_args=model_args,
                    explicit_label=label is not None,
                )
                roots[key] = path if path.is_dir() else path.parent
            entry = models[key]
            for _, _, runs in group:
                for run in runs:
                    _add_run(entry, run)
    entries = list(models.values())
    for key, entry in models.items():
        _attach_manifest(entry, [roots[key], *adapter_roots])
    _assign_labels(entries)
    return sorted(entries, key=_row_order)


def _core(model_args: dict[str, Any]) -> tuple[str, str]:
    adapter = next((str(model_args[k]).rstrip("/") for k in ADAPTER_ARGS if model_args.get(k)), "")
    return str(model_args.get("pretrained") or model_args.get("model") or ""), adapter


def _add_run(entry: ModelRuns, run: TaskRun) -> None:
    old = entry.tasks.get(run.task)
    if old is None:
        entry.tasks[run.task] = run
    elif (run.timestamp, str(run.results_file)) > (old.timestamp, str(old.results_file)):
        entry.superseded.append(old)
        entry.tasks[run.task] = run
    else:
        entry.superseded.append(run)


def _attach_manifest(entry: ModelRuns, roots: Sequence[Path]) -> None:
    """Find the adapter's ``rejalign_manifest.json`` (its path in model_args may be relative)."""
    adapter = entry.adapter
    if adapter is None:
        return
    found = find_manifest(adapter, roots, (t.results_file for t in entry.tasks.values()))
    if found is None:
        entry.manifest_note = f"no {MANIFEST_NAME} found for adapter {adapter!r}"
        return
    entry.manifest, entry.manifest_path = found


def _assign_labels(entries: list[ModelRuns]) -> None:
    """Default labels: the adapter's folder name, or the base model's name; made unique."""
    for e in entries:
        if not e.explicit_label:
            source = e.adapter or e.pretrained
            e.label = Path(source.rstrip("/")).name or source
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.label] = counts.get(e.label, 0) + 1
    for e in entries:
        if counts[e.label] > 1 and not e.explicit_label:
            e.label = f"{e.label} [{e.backend}]"
    seen: dict[str, int] = {}
    for e in entries:
        if e.label in seen:
            seen[e.label] += 1
            raise ReportInputError(
                f"two different models would both be labelled {e.label!r} (model_args "
                f"{e.model_args}); give them labels as LABEL=PATH"
            )
        seen[e.label] = 1


def _row_order(entry: ModelRuns) -> tuple:
    fraction = entry.refusal_fraction
    return (
        entry.adapter is not None,
        fraction is None,
        fraction if fraction is not None else 0.0,
        entry.label,
    )
