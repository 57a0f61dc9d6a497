"""The advisor's memory model against measured peaks: predicted and measured peak GiB for each bench row.

    python bench/memory_model.py                          # against the peaks recorded in docs/benchmarks.md
    python bench/lora_bench.py --rows ... > bench.jsonl   # on a GPU: the JSON lines lora_bench prints
    python bench/memory_model.py bench.jsonl              # against that run's peaks (tunery's rows)

Prints a markdown table (row, bs x seq, weights, measured, predicted, error, within 15% or 1 GiB) and exits 1
when a row is outside it. Runs on a CPU: the models are built on the meta device (tunery/advisor/shape.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measured_rows(path: str | None) -> list[tuple[str, str, int, int, str, float]]:
    """(row, shape, batch, seq, quant, peak GiB): the recorded rows, or tunery's rows of a lora_bench output."""
    from tunery.advisor.recorded import RECORDED

    if path is None:
        return [(r.row, r.shape, r.batch, r.seq, r.quant, r.peak_gib) for r in RECORDED]
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("{"):
            continue
        res = json.loads(line)
        # tunery's default step only: not HF+PEFT's or Unsloth's, nor a variant that changes memory (the packed
        # rows' block-mask run, no offload)
        variant = any(tag in res["stack"] for tag in ("-varlen_attention", "-offload"))
        if res["stack"].split()[0] != "tunery" or variant or res.get("err") or "peak_gib" not in res:
            continue
        quant = "4bit" if res["quant"].startswith("4bit") else ""
        rows.append((res["stack"], res["arch"], res["bs"], res["seq"], quant, res["peak_gib"]))
    return rows


def compare(rows) -> list[dict]:
    from tunery.advisor.memory import predict_peak
    from tunery.advisor.shape import shape_of
    from tunery.models.catalog import bench_shapes, family_of

    out = []
    for row, shape_name, batch, seq, quant, measured in rows:
        model_type, _, values = bench_shapes()[shape_name]
        peak = predict_peak(shape_of(model_type, values), "qlora" if quant else "lora", batch, seq,
                            lora_targets=family_of(model_type).lora_targets).gib
        ok = abs(peak - measured) <= max(0.15 * measured, 1.0)
        out.append({"row": row, "shape": shape_name, "bs": batch, "seq": seq, "weights": quant or "bf16",
                    "measured": measured, "predicted": round(peak, 2), "error": (peak - measured) / measured,
                    "ok": ok})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench_output", nargs="?", help="JSON lines printed by bench/lora_bench.py (default: recorded)")
    a = p.parse_args()
    results = compare(measured_rows(a.bench_output))
    print("| row | model | bs x seq | weights | measured GiB | predicted GiB | error | within 15% or 1 GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['shape']} | {r['bs']} x {r['seq']} | {r['weights']} | {r['measured']:.2f} | "
              f"{r['predicted']:.2f} | {r['error']:+.1%} | {'yes' if r['ok'] else '**no**'} |")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
