"""Data at scale on a CPU: a 50 MB row through `data inspect` (peak memory), and 100,000 rows through
`train --max-steps 5` (wall time, final eval capped by eval_max_rows). Each case runs as a child process, so its
peak memory (ru_maxrss) and time are its own; results in docs/benchmarks.md ("Data at scale").

    python bench/data_scale.py [--rows 100000] [--row-mb 50] [--out /tmp/data-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _child(args: list[str], env: dict) -> tuple[float, float, int, str]:
    """(seconds, peak GiB of the child, exit status, output tail) of `tunery ARGS`."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunery.cli.app", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child so far
    return seconds, peak_gib, proc.returncode, (proc.stdout + proc.stderr)[-600:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--row-mb", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("/tmp/data-scale"))
    args = parser.parse_args()
    from tunery.models.tiny import TinySpec, build_tiny_model

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TUNERY_HOME": str(out / "home"), "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    model = build_tiny_model(out / "model", ["Rewrite the date 1985-06-03.", "user\n", "assistant\n"],
                             TinySpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1))
    results = {}

    giant = out / "giant.jsonl"  # one row of row_mb MB of text, plus a few ordinary rows
    with open(giant, "w") as fh:
        fh.write(json.dumps({"prompt": "Summarise:", "completion": "word " * (args.row_mb * 2**20 // 5)}) + "\n")
        for i in range(20):
            fh.write(json.dumps({"prompt": f"Say {i}.", "completion": str(i)}) + "\n")
    seconds, peak, code, tail = _child(["data", "inspect", str(giant), "--model", str(model), "--max-seq-len",
                                        "512"], env)
    results["inspect a 50 MB row"] = {"seconds": round(seconds, 1), "peak_gib": round(peak, 2), "exit": code}
    print(f"inspect, {args.row_mb} MB row: {seconds:.1f} s, peak {peak:.2f} GiB, exit {code}", flush=True)

    many = out / "many.jsonl"
    with open(many, "w") as fh:
        for i in range(args.rows):
            fh.write(json.dumps({"prompt": f"Row {i}: rewrite the date {1900 + i % 120}-0{1 + i % 9}-1{i % 10}.",
                                 "completion": f"Day 1{i % 10} of month {1 + i % 9}, year {1900 + i % 120}."}) + "\n")
    seconds, peak, code, tail = _child(["train", "--model", str(model), "--data", str(many), "--output-dir",
                                        str(out / "runs"), "--name", f"rows-{time.time_ns()}", "--max-steps", "5",
                                        "--batch-size", "8", "--max-seq-len", "256", "--eval-samples", "0"], env)
    results[f"train {args.rows:,} rows, 5 steps"] = {"seconds": round(seconds, 1), "peak_gib": round(peak, 2),
                                                     "exit": code}
    print(f"train, {args.rows:,} rows, 5 steps: {seconds:.1f} s (peak so far {peak:.2f} GiB), exit {code}", flush=True)
    if code:
        print(tail, file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
