"""Where a profiled step's GPU waits on the host: read a torch.profiler Chrome trace (`BENCH_TRACE=f.json
python bench/lora_bench.py --one ... --profile`, plain or gzipped) and charge each idle gap on the GPU to the
host code that launched the kernel ending it.

    python bench/trace_gaps.py trace.json.gz [--min-us 5] [--top 25]

Host-device copies are left out (they run on a side stream). A gap is named by the outermost and innermost
profiled host ops around the late launch; "busy" is the union of kernel time.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def gaps(events: list[dict], min_us: float = 5.0) -> tuple[float, float, float, dict[str, list[float]]]:
    """(step span, GPU busy, GPU idle in gaps over `min_us`, {host ops: [count, idle us]}), all in us. Keys
    starting "(waited)" are gaps whose kernel had been launched before the gap began: the GPU waited on a
    dependency (an event, a copy), not on the host."""
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events if e.get("ph") == "X"
                and e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            ops[e["tid"]].append(e)
    late = []  # (launch event, idle us before its kernel, when the GPU went idle)
    busy, idle, end = 0.0, 0.0, None
    for k in kernels:
        start, stop = k["ts"], k["ts"] + k["dur"]
        if end is not None and start - end > min_us:
            idle += start - end
            late.append((launches.get(k["args"].get("correlation")), start - end, end))
        busy += max(0.0, stop - max(start, end if end is not None else start))
        end = stop if end is None else max(end, stop)
    span = (end - kernels[0]["ts"]) if kernels else 0.0
    charged: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    def charge(key: str, gap: float) -> None:
        charged[key][0] += 1
        charged[key][1] += gap

    by_thread = defaultdict(list)
    for launch, gap, idle_from in late:
        if launch is None:
            charge("(launch not in trace)", gap)
        elif launch["ts"] + launch["dur"] < idle_from:
            charge(f"(waited) {launch['name']}", gap)
        else:
            by_thread[launch["tid"]].append((launch["ts"], gap))
    for tid, points in by_thread.items():  # sweep: the ops open at each late launch
        spans = sorted(ops[tid], key=lambda e: (e["ts"], -e["dur"]))
        stack, i = [], 0
        for ts, gap in sorted(points):
            while i < len(spans) and spans[i]["ts"] <= ts:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < spans[i]["ts"]:
                    stack.pop()
                stack.append(spans[i])
                i += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < ts:
                stack.pop()
            open_ops = [e["name"] for e in stack if e["ts"] + e["dur"] >= ts]
            charge(f"{open_ops[0][:50]} > {open_ops[-1][:50]}" if open_ops else "(no op open)", gap)
    return span, busy, idle, dict(charged)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--min-us", type=float, default=5.0)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    span, busy, idle, charged = gaps(load(a.trace), a.min_us)
    print(f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / max(span, 1):.0f}%), "
          f"idle in gaps over {a.min_us:g} us: {idle / 1e3:.1f} ms; by the host ops around the late launch:")
    for key, (n, t) in sorted(charged.items(), key=lambda kv: -kv[1][1])[:a.top]:
        print(f"{t / 1e3:8.2f} ms  x{int(n):<5d} {key}")


if __name__ == "__main__":
    main()
