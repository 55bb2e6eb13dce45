"""Speed and peak memory of ``rejalign-train mix --official`` against the upstream approach.

One run, side by side, on synthetic LLaVA-format JSON arrays shaped like the paper's inputs (a
665k-record instruction file like LLaVA v1.5 mix665k, a 60k-record refusal source like
LLaVA-Med; some ids shared so the exclusion has work to do), drawing the paper's 2000 refusal
and 5000 normal records with ``--random_choose``:

* upstream: whole-file ``json.load`` of both files, exclusion by membership in a list of drawn
  ids, ``random.sample`` on record lists (tests/fixtures/upstream_mix.py);
* rejalign: indexed files, set-based exclusion, only the drawn records parsed.

Each approach runs in a fresh process that reports its own peak RSS (``ru_maxrss``: for the
memory-mapped inputs this includes the file pages it touched) and the time of the mixing itself
(reading, drawing, writing), excluding interpreter start-up and imports, which are reported
separately as process wall time. The two outputs must be byte-identical.

    python benchmarks/mix.py                      # 665k records, temporary folder
    python benchmarks/mix.py --workdir /tmp/mixb  # keep (and reuse) the synthetic files
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ROOT / "tests" / "fixtures" / "upstream_mix.py"

_WORDS = (
    "the a of in on with what is shown image picture color person people left right table dog "
    "cat car tree sky red blue green white black answer question man woman street building "
    "two three small large sitting standing holding wearing near behind front water field"
).split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def synthetic_record(rng: random.Random, rid: str, *, text_only: bool) -> dict:
    """A LLaVA record: 1-5 human/gpt pairs, the image placeholder first or last, follow-ups."""
    turns = []
    for t in range(rng.randint(1, 5)):
        question = _sentence(rng, 4, 16) + "?"
        if t > 0 and rng.random() < 0.15:
            question = "What about " + question
        if t == 0 and not text_only:
            question = f"<image>\n{question}" if rng.random() < 0.8 else f"{question}\n<image>"
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": _sentence(rng, 2, 45) + "."})
    record: dict = {"id": rid}
    if not text_only:
        record["image"] = f"coco/train2017/{rid}.jpg"
    record["conversations"] = turns
    return record


def write_synthetic(path: Path, n: int, *, seed: int, id_offset: int, text_only: float) -> None:
    """A JSON array of ``n`` records, formatted as upstream writes its files (indent=4)."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("[\n")
        for i in range(n):
            record = synthetic_record(
                rng, f"{id_offset + i:012d}", text_only=rng.random() < text_only
            )
            body = json.dumps(record, ensure_ascii=False, indent=4).replace("\n", "\n    ")
            fh.write("    " + body + (",\n" if i < n - 1 else "\n"))
        fh.write("]")
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _child(which: str, argv: list[str]) -> None:
    """Run one approach in this process; print its timing and peak memory as JSON."""
    import resource

    if which == "upstream":
        sys.path.insert(0, str(UPSTREAM.parent))
        from upstream_mix import main as run
    else:
        from transformers import HfArgumentParser  # noqa: F401  (imported lazily by main)

        from rejalign_train.mixing import main as run
    start, cpu_start = time.perf_counter(), time.process_time()
    status = run(argv)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if status not in (None, 0):
        raise SystemExit(f"{which} failed with status {status}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"work_s": seconds, "work_cpu_s": cpu, "peak_rss_mib": peak_mib}))


def _run(which: str, argv: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "_child", which, *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{which} run failed:\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        _child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normal-records", type=int, default=665_000)
    parser.add_argument("--refusal-records", type=int, default=60_000)
    parser.add_argument("--num-refusal", type=int, default=2000)
    parser.add_argument("--num-normal", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="rejalign runs (median reported)")
    parser.add_argument("--workdir", help="folder for the synthetic files (kept); default: temp")
    args = parser.parse_args()

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mixbench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        normal = workdir / f"normal_{args.normal_records}.json"
        refusal = workdir / f"refusal_{args.refusal_records}.json"
        if not normal.exists():
            print(f"writing {normal} ...", file=sys.stderr)
            write_synthetic(normal, args.normal_records, seed=1, id_offset=0, text_only=0.06)
        if not refusal.exists():
            print(f"writing {refusal} ...", file=sys.stderr)
            # A tenth of the refusal ids also occur in the normal file.
            offset = args.normal_records - args.refusal_records // 10
            write_synthetic(refusal, args.refusal_records, seed=2, id_offset=offset, text_only=0)
        sizes = {p.name: p.stat().st_size / 2**20 for p in (normal, refusal)}

        up_out, our_out = workdir / "upstream_out.json", workdir / "rejalign_out.json"
        load_before = os.getloadavg()[0]
        upstream = _run(
            "upstream",
            [
                "--file1", str(refusal), "--file2", str(normal), "--output", str(up_out),
                "--sample_size1", str(args.num_refusal), "--sample_size2", str(args.num_normal),
                "--random_choose", "--change_reply",
            ],
        )  # fmt: skip
        ours_runs = [
            _run(
                "rejalign",
                [
                    "--official",
                    "--refusal-source",
                    str(refusal),
                    "--normal-source",
                    str(normal),
                    "--num-refusal",
                    str(args.num_refusal),
                    "--num-normal",
                    str(args.num_normal),
                    "--random-choose",
                    "--output",
                    str(our_out),
                ],
            )  # fmt: skip
            for _ in range(max(1, args.repeat))
        ]
        identical = _sha256(up_out) == _sha256(our_out)
        ours = {
            key: statistics.median(run[key] for run in ours_runs)
            for key in ("work_s", "work_cpu_s", "process_s", "peak_rss_mib")
        }

        print(f"inputs: {', '.join(f'{k} {v:.0f} MiB' for k, v in sizes.items())}")
        print(
            f"draw: {args.num_refusal} refusal + {args.num_normal} normal, --random_choose, "
            f"seed 0; rejalign runs: {len(ours_runs)} (median)"
        )
        print(
            f"{'approach':<12}{'mixing s':>10}{'mixing CPU s':>14}{'process s':>11}"
            f"{'peak RSS MiB':>14}"
        )
        for name, r in (("upstream", upstream), ("rejalign", ours)):
            print(
                f"{name:<12}{r['work_s']:>10.2f}{r['work_cpu_s']:>14.2f}{r['process_s']:>11.2f}"
                f"{r['peak_rss_mib']:>14.0f}"
            )
        print(f"speed-up, mixing wall time: {upstream['work_s'] / ours['work_s']:.1f}x")
        print(f"speed-up, mixing CPU time: {upstream['work_cpu_s'] / ours['work_cpu_s']:.1f}x")
        print(f"speed-up, whole process: {upstream['process_s'] / ours['process_s']:.1f}x")
        print(
            f"peak memory, rejalign/upstream: {ours['peak_rss_mib'] / upstream['peak_rss_mib']:.2f}"
        )
        print(f"load average (1 min) before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")
        print(f"outputs byte-identical: {identical}")
        if not identical:
            raise SystemExit("rejalign's --official output differs from the upstream approach")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
