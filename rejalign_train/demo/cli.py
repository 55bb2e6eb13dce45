"""``rejalign-demo --output-dir demo/``: the whole mission in minutes on a CPU, no download.

A SYNTHETIC DEMONSTRATION of the paper's loop with a toy model: build the small
instruction-tuned VLM (``model.py``) and benign training sources (``sources.py``), then run the
real ``rejalign-sweep`` on them -- ``rejalign-train mix`` and ``fit`` per refusal fraction,
``rejalign-eval`` (lm-eval, ``hf-multimodal`` on the CPU) of the base model and every adapter on
FigStep-Tiny (and FigStep's text baseline), and ``rejalign-report`` with the
ASR-against-refusal-fraction figure. Every step is resumable: a rerun skips finished work.

Exit status (``rejalign_tasks.console``): 0 done, 1 a step failed, 2 bad options, 130
interrupted (rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rejalign_tasks.console import CommandFailed, UsageError, run_command, split_config
from rejalign_train.sweep.supervise import stop

PROG = "rejalign-demo"
DEFAULT_FRACTIONS = "0,0.1,0.3,1"
QUICK_FRACTIONS = "0,1"
SWEEP_DIR = "sweep"
SWEEP_CONFIG = "demo-sweep.yaml"
TASK_TINY = "rejalign_figstep_tiny"
TASK_TEXT = "rejalign_figstep_text"

# (full, --quick): records per mix, LoRA steps per fit
SIZES = {"full": {"total": 20, "fit_steps": 40}, "quick": {"total": 16, "fit_steps": 30}}
# The tiny model needs ~5 words to count as compliance; the judge reads the whole completion.
MAX_GEN_TOKS = 32
BATCH_SIZE = 25
# `rejalign-train fit` on the toy model: the recipe's 2e-4 is for 7B models over thousands of
# steps; one process, no checkpoints, on the CPU.
FIT_OPTIONS = {
    "use_cpu": True,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "dataloader_num_workers": 0,
    "gradient_checkpointing": False,
    "learning_rate": 2e-3,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
}
_STEP_LINE = re.compile(r"rejalign-sweep (\S+): (finished in .*|finished .*, skipping)$")
_RUNNING = re.compile(r"rejalign-sweep (\S+): running")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A SYNTHETIC DEMONSTRATION of rejalign on a CPU in minutes, with no download "
        "but SafeBench's pinned CSV files: builds a tiny instruction-tuned LLaVA that refuses "
        "harmful text but complies with FigStep's typographic attacks, then runs the real "
        "rejalign-sweep (rejalign-train mix + fit per refusal fraction, rejalign-eval through "
        "lm-eval, rejalign-report) on benign synthetic data. The report's FigStep-Tiny ASR "
        "falls as the refusal fraction grows.",
        epilog="Reruns resume: finished steps are skipped. The output folder's README.md says "
        "what ran; the report is OUTPUT_DIR/sweep/report/report.md. A YAML/JSON file given "
        "first sets option defaults; flags after it override it. The numbers are a toy model's, "
        "not a safety result.",
    )
    parser.add_argument(
        "--output-dir",
        "--output_dir",
        required=True,
        dest="output_dir",
        help="Folder for everything (created; a rerun resumes it).",
    )
    parser.add_argument(
        "--fractions",
        default=None,
        help=f"Refusal fractions in [0, 1], comma-separated (default "
        f"{DEFAULT_FRACTIONS}; with --quick {QUICK_FRACTIONS}).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Reduced sizes for CI: two fractions, smaller mixes, shorter fits, no text baseline.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the model, the data, the mixes and the fits (default 0).",
    )
    parser.add_argument(
        "--text-baseline",
        dest="text_baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Also evaluate FigStep's text baseline (500 prompts as text; "
        "default: on, off with --quick).",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Show the tools' own output instead of the progress bar.",
    )
    return parser  # fmt: skip


def _fractions(text: str) -> list[float]:
    from rejalign_train.sweep.options import SweepError, parse_fractions

    try:
        return parse_fractions([text])
    except SweepError as exc:
        raise UsageError(str(exc)) from None


def _check_output_dir(path: Path) -> None:
    if "," in str(path):  # lm-eval's model_args are comma-separated
        raise UsageError(f"--output-dir {path}: the path must not contain a comma")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {path}: not a folder")


def _fetch_data() -> None:
    """SafeBench's pinned files, through the product's loader, before anything is trained."""
    from rejalign_tasks.benchmarks.data import DataUnavailableError, data_file

    for relpath in ("figstep/safebench.csv", "figstep/SafeBench-Tiny.csv"):
        try:
            data_file(relpath)
        except DataUnavailableError as exc:
            raise CommandFailed(str(exc)) from exc


def build_model(out: Path, *, seed: int, quiet: bool) -> Path:
    """The instruction-tuned toy VLM, in a folder named after its recipe (so a changed recipe
    is a new model to the sweep's step cache); built once."""
    import logging

    from rejalign_train.demo.model import build_instruct_llava, build_recipe, is_built, recipe_key

    recipe = build_recipe(seed=seed)
    work = out / "model" / f"instruct-{recipe_key(recipe)}"
    model = work / "model"
    if is_built(model, recipe):
        print(f"{PROG}: [1/3] instruction-tuned toy VLM: {model} (built before, reused)")
        return model
    print(f"{PROG}: [1/3] building the instruction-tuned toy VLM (full finetune on synthetic "
          "visual instructions + text refusals)", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    build_instruct_llava(work, seed=seed, progress=not quiet)
    print(f"{PROG}: built {model} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model


def write_sweep_config(
    out: Path, model: Path, refusal: Path, normal: Path, spec: Path, *, sizes: dict,
    fractions: list[float], tasks: list[str], seed: int,
) -> Path:  # fmt: skip
    import yaml

    config = {
        "model": str(model),
        "refusal_source": str(refusal),
        "normal_source": str(normal),
        "output_dir": str(out / SWEEP_DIR),
        "total": sizes["total"],
        "fractions": [repr(f) for f in fractions],
        "backend": "hf-multimodal",
        "tasks": ",".join(tasks),
        "device": "cpu",
        "batch_size": str(BATCH_SIZE),
        "model_args": "dtype=float32",
        "gen_kwargs": f"max_gen_toks={MAX_GEN_TOKS}",
        "report_spec": str(spec),
        "mix": {"seed": seed},
        "fit": {**FIT_OPTIONS, "max_steps": sizes["fit_steps"], "seed": seed},
        "eval": {"seed": seed},
    }
    path = out / SWEEP_CONFIG
    text = "# The refusal-fraction sweep of rejalign-demo (a SYNTHETIC DEMONSTRATION).\n"
    text += f"# Run it yourself: rejalign-sweep {path}\n"
    path.write_text(text + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_sweep(config: Path, n_steps: int, *, verbose: bool) -> None:
    """``python -m rejalign_train.sweep CONFIG`` (``rejalign-sweep``), one bar tick per step."""
    from tqdm.auto import tqdm

    cmd = [sys.executable, "-m", "rejalign_train.sweep", str(config)]
    if verbose:
        cmd.append("--verbose")
    env = {**os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")  # the toy model is too small for threads to help
    print(f"{PROG}: [3/3] $ {shlex.join(['rejalign-sweep', str(config)])}", flush=True)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    )
    assert proc.stdout is not None
    lines: list[str] = []
    bar = None if verbose else tqdm(total=n_steps, desc="sweep", unit="step", file=sys.stdout)
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if bar is None:
                sys.stdout.write(line)
                sys.stdout.flush()
                continue
            running, done = _RUNNING.search(line), _STEP_LINE.search(line.rstrip())
            if running:
                bar.set_postfix_str(f"{running.group(1)} running")
            elif done:
                bar.update(1)
                bar.set_postfix_str(f"{done.group(1)} done")
        code = proc.wait()
    except BaseException:
        stop(proc)
        raise
    finally:
        if bar is not None:
            bar.close()
    if code == 130:
        raise KeyboardInterrupt
    if code != 0:
        tail = "\n  ".join(lines[-25:])
        raise CommandFailed(f"rejalign-sweep failed (exit status {code}):\n  {tail}")


def read_results(report: Path) -> list[dict[str, str]]:
    """The rows of the report's main table (``table_main.csv``)."""
    with open(report / "table_main.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def results_markdown(rows: list[dict[str, str]], headers: list[str]) -> str:
    head = "| row | refusal fraction | " + " | ".join(headers) + " |"
    out = ["Results (from `sweep/report/table_main.csv`):", "", head,
           "|---|---:|" + "---:|" * len(headers)]  # fmt: skip
    for r in rows:
        frac = r["refusal_fraction"] or "- (base model)"
        values = []
        for h in headers:
            try:
                values.append(f"{float(r[h]):.1f}")
            except (KeyError, ValueError):
                values.append(r.get(h, "-"))
        out.append(f"| {r['model']} | {frac} | " + " | ".join(values) + " |")
    return "\n".join(out) + "\n"


def _body(argv: list[str]) -> int:
    parser = build_parser()
    argv, _ = split_config(parser, argv)
    args = parser.parse_args(argv)
    out = Path(args.output_dir).expanduser().resolve()
    _check_output_dir(out)
    mode = "quick" if args.quick else "full"
    sizes = SIZES[mode]
    fractions = _fractions(args.fractions or (QUICK_FRACTIONS if args.quick else DEFAULT_FRACTIONS))
    text_baseline = (not args.quick) if args.text_baseline is None else args.text_baseline
    tasks = [TASK_TINY] + ([TASK_TEXT] if text_baseline else [])

    from rejalign_train.demo.sources import (
        ASR_HEADER,
        SYNTHETIC,
        TEXT_ASR_HEADER,
        report_spec,
        write_notice,
        write_sources,
    )
    from rejalign_train.manifest import utc_now

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    notice = {
        "mode": mode,
        "seed": args.seed,
        "started": utc_now(),
        "model": "model/instruct-*/model",
        "sweep_config": SWEEP_CONFIG,
        "fractions": ", ".join(f"{f:g}" for f in fractions),
        "tasks": " and ".join(f"`{t}`" for t in tasks),
    }
    write_notice(out, **notice)
    print(f"{PROG}: {SYNTHETIC} with a tiny random model and synthetic data, into {out}")
    _fetch_data()
    model = build_model(out, seed=args.seed, quiet=args.verbose)
    notice["model"] = str(model.relative_to(out))
    print(f"{PROG}: [2/3] benign training sources and the report spec: {out / 'data'}")
    refusal, normal = write_sources(out / "data", seed=args.seed)
    spec = report_spec(out / "data" / "report_spec.yaml", text_baseline=text_baseline)
    config = write_sweep_config(
        out, model, refusal, normal, spec,
        sizes=sizes, fractions=fractions, tasks=tasks, seed=args.seed,
    )  # fmt: skip
    write_notice(out, **notice)
    run_sweep(config, 3 * len(fractions) + 2, verbose=args.verbose)

    report = out / SWEEP_DIR / "report"
    rows = read_results(report)
    headers = [h for h in (ASR_HEADER, TEXT_ASR_HEADER) if h in rows[0]]
    summary = results_markdown(rows, headers)
    minutes = (time.perf_counter() - t0) / 60
    write_notice(out, results=summary + f"\nThis run took {minutes:.1f} minutes.", **notice)
    print(f"\n{PROG}: {SYNTHETIC} (toy model, synthetic data: not a safety result)\n")
    print(summary)
    print(f"report: {report / 'report.md'}")
    print(f"figure: {report / 'asr_vs_refusal_fraction.png'}")
    print(f"notice: {out / 'README.md'}   ({minutes:.1f} minutes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return its exit status (0 done, 1 a step failed, 2 bad options, 130)."""
    return run_command(
        PROG, _body, argv, interrupted="interrupted; rerun the same command to continue"
    )


if __name__ == "__main__":
    sys.exit(main())
