"""The sweep's steps in order: mixes, the base model's eval, fit + eval per row, the report.

A row is a refusal fraction or a named arm (:mod:`rejalign_train.sweep.arms`); both run the same
steps in ``OUT/LABEL/{mix,fit,eval}``.

Each step's inputs include its upstream steps' output digests, so a changed option redoes
exactly the steps it affects (a new fit option: every fit, eval and the report; a new
``--limit``: the evals and the report) and never reuses stale results; whether a step is
finished is the step cache's business (``cache.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rejalign_tasks.contracts import sha256_file
from rejalign_train.manifest import utc_now, write_json_atomic
from rejalign_train.sweep.arms import Row
from rejalign_train.sweep.cache import StepCache, argv_key, file_key
from rejalign_train.sweep.judging import JUDGE_DIR, judge_command, judge_engine, link_run
from rejalign_train.sweep.options import (
    BASE_LABEL,
    SweepConfig,
    SweepError,
    flag_names,
    row_mix_args,
)
from rejalign_train.sweep.supervise import run_logged

logger = logging.getLogger("rejalign_train.sweep")

CONFIG_NAME = "sweep.json"
REPORT_DIR = "report"
ADAPTER_DIR = "adapter"
RESULTS_DIR = "results"
STOP_AFTER = ("mix", "fit", "eval", "report")
BACKEND_ADAPTER_ARG = {"hf-multimodal": "peft", "vllm-vlm": "lora_local_path"}


@dataclass
class StepRecord:
    """What a run did with one step, for the closing summary."""

    name: str
    state: str  # "skipped" | "ran" | "todo" | "after"
    reason: str


def model_key(model: str) -> str:
    """A local model by its absolute path (so the working folder does not matter), else the id."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


class Sweep:
    """Runs (or, dry, plans) the steps in order: mixes, base eval, fit+eval per row, report.

    The mixes come first (cheap, and they check every record of the sources), then the base
    model's evaluation (it checks the evaluation options and data), before hours of training.
    """

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self.args = cfg.args
        self.root = cfg.root
        self.dry_run = cfg.args.dry_run
        self.records: list[StepRecord] = []
        self._digests: dict[str, str] = {}

    # -- bookkeeping

    def _log(self, name: str, message: str) -> None:
        logger.info("%s: %s", name, message)

    def _digest(self, source: str | None) -> str | None:
        if source is None:
            return None
        path = str(Path(source).expanduser().resolve())
        if path not in self._digests:
            self._digests[path] = sha256_file(path)
        return self._digests[path]

    def sources_key(self, row: Row) -> dict[str, Any]:
        """A row's sources' digests, each file hashed once per run (they can be large)."""
        return {
            "refusal_source": self._digest(row.refusal_source),
            "normal_source": self._digest(row.normal_source),
        }

    def step(
        self,
        name: str,
        folder: Path,
        inputs: dict | None,
        execute: Callable[[Path, bool], list[Path]],
        resumable: Callable[[Path], bool] | None = None,
    ) -> str | None:
        """Skip or run one step; return its outputs' digest (None: not known in a dry run)."""
        if inputs is None:
            self.records.append(StepRecord(name, "after", "its input step runs first"))
            self._log(name, "to run (after the step it depends on)")
            return None
        cache = StepCache(folder)
        marker, reason = cache.status(inputs)
        if marker is not None:
            self.records.append(StepRecord(name, "skipped", reason))
            self._log(name, f"finished {marker.get('finished')}, skipping")
            return marker["outputs_digest"]
        resume = resumable is not None and cache.started_with(inputs) and resumable(folder)
        if self.dry_run:
            self.records.append(StepRecord(name, "todo", reason))
            self._log(name, f"to run ({reason}{'; would resume' if resume else ''})")
            return None
        self._log(name, f"running ({reason}{'; resuming its checkpoint' if resume else ''})")
        if not resume:
            cache.clear()  # never a marker beside partial work
        started = cache.mark_started(inputs)
        t0 = time.perf_counter()
        outputs = cache.output_digests(execute(folder, resume))
        marker = cache.mark_finished(  # last: the step is now finished
            name,
            inputs,
            outputs,
            started=started,
            seconds=round(time.perf_counter() - t0, 3),
            resumed=resume,
        )
        self.records.append(StepRecord(name, "ran", reason))
        self._log(name, f"finished in {marker['seconds']:.1f} s")
        return marker["outputs_digest"]

    # -- the steps

    def mix_data(self, row: Row) -> Path:
        """The mix's data file (``.json`` in upstream's --official layout, else JSON Lines)."""
        return self.root / row.label / "mix" / row.data_name

    def mix_step(self, row: Row) -> str | None:
        label = row.label
        folder = self.root / label / "mix"
        data = self.mix_data(row)
        # A fraction's key is what it was before arms existed: finished sweeps stay finished.
        inputs = {**row.key, **self.sources_key(row), "mix_args": argv_key(row.mix_argv)}

        def execute(folder: Path, resume: bool) -> list[Path]:
            from rejalign_train.mixing import MixError, manifest_path, mix, write_mix
            from rejalign_train.records import RecordError

            try:
                args = row_mix_args(row, data, label if row.arm else "")
                result = mix(args)
                write_mix(args, result)
            except (MixError, RecordError) as exc:
                raise SweepError(f"{label}/mix: {exc}") from exc
            return [data, manifest_path(data), *result.image_files]

        return self.step(f"{label}/mix", folder, inputs, execute)

    def fit_command(self, data: Path, adapter: Path, row: Row | None = None) -> list[str]:
        """``rejalign-train fit`` on one mix, started by ``--fit-launcher`` or this Python."""
        row = row or self.cfg.rows[0]
        launcher = shlex.split(self.args.fit_launcher or "") or [sys.executable]
        cmd = [*launcher, "-m", "rejalign_train.cli", "fit"]
        if self.args.fit_config:  # fit reads a configuration file only as its first argument
            cmd.append(str(Path(self.args.fit_config).expanduser().resolve()))
        cmd += ["--model", self.args.model, "--data", str(data)]
        cmd += ["--image_root", str(row.image_root), "--output_dir", str(adapter)]
        cmd += self.cfg.passthrough["fit"]
        given = set(flag_names(self.cfg.passthrough["fit"])) | self.cfg.fit_config_keys
        if row.refusal_sentence and "refusal_sentence" not in given:
            # The mix's custom sentence is the one fit must recognise ("train without EOS").
            cmd += ["--refusal_sentence", row.refusal_sentence]
        return cmd

    def eval_command(self, adapter: Path | None, results: Path) -> list[str]:
        """``rejalign-eval`` of the base model, or of it with ``adapter``, into ``results``."""
        model_args = f"pretrained={self.args.model}"
        if adapter is not None:
            model_args += f",{BACKEND_ADAPTER_ARG[self.args.backend]}={adapter}"
        if self.args.model_args:
            model_args += f",{self.args.model_args}"
        cmd = [sys.executable, "-m", "rejalign_tasks.harness.cli", "--model", self.args.backend]
        cmd += ["--model_args", model_args, "--tasks", self.args.tasks]
        cmd += ["--output_path", str(results)]
        for option in ("device", "batch_size", "limit", "gen_kwargs", "metadata"):
            value = getattr(self.args, option)
            if value is not None:
                cmd += [f"--{option}", value]
        return cmd + self.cfg.passthrough["eval"]

    def fit_step(self, row: Row, mix_digest: str | None) -> str | None:
        label = row.label
        folder = self.root / label / "fit"
        data = self.mix_data(row)
        inputs = None
        if mix_digest is not None:
            inputs = {
                "model": model_key(self.args.model),
                "mix": mix_digest,
                "image_root": str(row.image_root),
                "fit_config": file_key(self.args.fit_config) if self.args.fit_config else None,
                "fit_args": argv_key(self.cfg.passthrough["fit"]),
                "fit_launcher": self.args.fit_launcher,
                "refusal_sentence": row.refusal_sentence,
            }

        def execute(folder: Path, resume: bool) -> list[Path]:
            cmd = self.fit_command(data, folder / ADAPTER_DIR, row)
            if resume:  # fit --resume skips (and removes) a checkpoint a kill cut short
                cmd.append("--resume")
            run_logged(cmd, folder / "fit.log", self.args.verbose, f"{label}/fit")
            from rejalign_train.manifest import is_finished

            adapter = folder / ADAPTER_DIR
            if not is_finished(adapter):
                raise SweepError(f"{label}/fit: {adapter} holds no finished adapter")
            return [p for p in adapter.iterdir() if p.is_file()]

        def resumable(folder: Path) -> bool:
            from rejalign_train.fit import incomplete_dir, trainer_checkpoints

            work = incomplete_dir(folder / ADAPTER_DIR)
            return self.args.resume_fit and bool(trainer_checkpoints(work)[0])

        return self.step(f"{label}/fit", folder, inputs, execute, resumable)

    def eval_step(self, label: str, fit_digest: str | None, adapter: Path | None) -> str | None:
        folder = self.root / label / "eval"
        inputs = None
        if adapter is None or fit_digest is not None:
            inputs = {
                "model": model_key(self.args.model),
                "adapter": fit_digest,
                **{
                    k: getattr(self.args, k)
                    for k in (
                        "backend",
                        "tasks",
                        "limit",
                        "model_args",
                        "device",
                        "batch_size",
                        "gen_kwargs",
                        "metadata",
                    )
                },
                "eval_args": argv_key(self.cfg.passthrough["eval"]),
            }

        def execute(folder: Path, resume: bool) -> list[Path]:
            cmd = self.eval_command(adapter, folder / RESULTS_DIR)
            run_logged(cmd, folder / "eval.log", self.args.verbose, f"{label}/eval")
            results = sorted((folder / RESULTS_DIR).rglob("results_*.json"))
            if len(results) != 1:
                raise SweepError(
                    f"{label}/eval: expected one results_*.json under {folder / RESULTS_DIR}, "
                    f"found {len(results)}"
                )
            return results + sorted(results[0].parent.glob("samples_*.jsonl"))

        return self.step(f"{label}/eval", folder, inputs, execute)

    def judge_step(self, label: str, eval_digest: str | None) -> str | None:
        """The model judge over one row's evaluation (``--judge``), in ``LABEL/judge``."""
        folder = self.root / label / JUDGE_DIR
        inputs = None
        if eval_digest is not None:
            args = self.args
            inputs = {
                "eval": eval_digest,
                "judge": args.judge,
                "judge_model": model_key(args.judge_model) if args.judge_model else None,
                "engine": judge_engine(args),
                "device": args.device if judge_engine(args) == "hf" else None,
            }

        def execute(folder: Path, resume: bool) -> list[Path]:
            results = folder / RESULTS_DIR
            linked = set(link_run(self.root / label / "eval" / RESULTS_DIR, results))
            cmd = judge_command(self.args, results)
            run_logged(cmd, folder / "judge.log", self.args.verbose, f"{label}/judge")
            return sorted(p for p in results.rglob("*") if p.is_file() and p not in linked)

        return self.step(f"{label}/judge", folder, inputs, execute)

    def report_step(self, evals: dict[str, str | None]) -> str | None:
        folder = self.root / REPORT_DIR
        baseline = self.cfg.baseline
        inputs = None
        if all(d is not None for d in evals.values()):
            inputs = {
                "evals": evals,  # with --judge: the judge steps' digests
                "baseline": baseline,
                "report_spec": file_key(self.args.report_spec) if self.args.report_spec else None,
            }

        def execute(folder: Path, resume: bool) -> list[Path]:
            from rejalign_tasks.report.errors import ReportInputError
            from rejalign_tasks.report.report import make_report
            from rejalign_tasks.report.spec import SpecError, load_spec

            step = JUDGE_DIR if self.args.judge else "eval"
            runs = [f"{label}={self.root / label / step / RESULTS_DIR}" for label in evals]
            try:
                spec = load_spec(self.args.report_spec) if self.args.report_spec else None
                return make_report(runs, folder, spec=spec, baseline=baseline)
            except (ReportInputError, SpecError) as exc:
                raise SweepError(f"report: {exc}") from exc

        return self.step(REPORT_DIR, folder, inputs, execute)

    def _judged(self, label: str, eval_digest: str | None) -> str | None:
        """The digest the report depends on: the judge step's with ``--judge``, else the eval's."""
        return self.judge_step(label, eval_digest) if self.args.judge else eval_digest

    # -- the whole

    def run(self) -> list[StepRecord]:
        if not self.dry_run:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                self.root / CONFIG_NAME,
                {
                    "arguments": dataclasses.asdict(self.args),
                    "fractions": self.cfg.fractions,
                    "arms": self.cfg.arms,
                    "passthrough": self.cfg.passthrough,
                    "image_root": str(self.cfg.image_root),
                    "written": utc_now(),
                },
            )
        last = STOP_AFTER.index(self.args.stop_after)
        mixes = {row.label: self.mix_step(row) for row in self.cfg.rows}
        evals: dict[str, str | None] = {}
        if self.args.base and last >= 2:
            evals[BASE_LABEL] = self._judged(BASE_LABEL, self.eval_step(BASE_LABEL, None, None))
        for row in self.cfg.rows if last >= 1 else ():
            fit_digest = self.fit_step(row, mixes[row.label])
            if last >= 2:
                adapter = self.root / row.label / "fit" / ADAPTER_DIR
                digest = self.eval_step(row.label, fit_digest, adapter)
                evals[row.label] = self._judged(row.label, digest)
        if last >= 3:
            self.report_step(evals)
        return self.records
