"""bench/trace_gaps.py: idle gaps on the GPU charged to the host ops that launched late."""

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("trace_gaps", Path(__file__).parents[1] / "bench" / "trace_gaps.py")
trace_gaps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_gaps)


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_gaps_charge_the_late_launch_to_its_enclosing_ops(tmp_path):
    events = [
        _x("cpu_op", "step", 0, 200), _x("cpu_op", "aten::mm", 30, 15), _x("cpu_op", "lora_out", 100, 40),
        _x("cpu_op", "aten::addmm", 110, 20),
        _x("cuda_runtime", "cudaLaunchKernel", 35, 5, correlation=1),
        _x("cuda_driver", "cuLaunchKernel", 115, 5, correlation=2),  # triton launches through the driver
        _x("kernel", "k0", 0, 10, tid=7, correlation=99),  # launched before the trace: no gap before it
        _x("kernel", "k1", 40, 10, tid=7, correlation=1),  # 30 us after k0 ended
        _x("kernel", "k1b", 52, 60, tid=7, correlation=98),  # 2 us gap: under the threshold
        _x("gpu_memcpy", "Memcpy DtoH", 60, 500, tid=8),  # side-stream copy: not GPU work here
        _x("kernel", "k2", 120, 5, tid=7, correlation=2),  # 8 us after k1b ended
        _x("cuda_runtime", "cudaLaunchKernel", 100, 2, correlation=3),
        _x("kernel", "k3", 140, 5, tid=7, correlation=3),  # launched well before its 15 us gap: a wait
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    span, busy, idle, charged = trace_gaps.gaps(trace_gaps.load(str(path)), min_us=5)
    assert (span, busy, idle) == (145, 90, 53)
    assert charged == {"step > aten::mm": [1, 30], "step > aten::addmm": [1, 8], "(waited) cudaLaunchKernel": [1, 15]}
