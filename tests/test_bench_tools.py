"""bench/trace_gaps.py: idle gaps on the GPU charged to the host ops that launched late; bench/lora_bench.py: the
longest-sequence search."""

import importlib.util
import json
from pathlib import Path

import pytest

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


_bench_spec = importlib.util.spec_from_file_location("lora_bench",
                                                     Path(__file__).parents[1] / "bench" / "lora_bench.py")
lora_bench = importlib.util.module_from_spec(_bench_spec)
_bench_spec.loader.exec_module(lora_bench)


def _fake_spawn(limit: int, calls: list):
    """A stack whose peak is 1 GiB + 0.25 GiB per 1k tokens, out of memory past `limit` tokens."""

    def spawn(stack, arch, bs, seq, quant, steps, extra, warmup=3):
        calls.append(seq)
        if seq > limit:
            return {"stack": stack, "seq": seq, "err": "OOM"}
        return {"stack": stack, "seq": seq, "err": None, "peak_gib": 1 + seq / 4096, "tok_s": 1, "step_s": 1}

    return spawn


@pytest.mark.parametrize("limit, checked, note", [
    (303104, [307200, 303104], "longest: 303,104 fits, 307,200 does not"),  # the line over-estimates by one
    (319488, [307200, 311296, 315392, 319488], "319,488 fits; the limit was not reached in 4 lengths"),
    (311296, [307200, 311296, 315392], "longest: 311,296 fits, 315,392 does not"),
])
def test_max_seq_searches_both_ways_to_the_limit(limit, checked, note):
    calls = []
    res = lora_bench._max_seq("tunery", "llama-8b", [], budget_gib=76.0, spawn=_fake_spawn(limit, calls))
    assert calls[:2] == [8192, 16384] and calls[2:] == checked
    assert res["note"] == note and res["estimate"] == 16384 + int(71 * 4096) and "tok_s" not in res


def test_device_queue_runs_its_commands_in_the_background_across_calls(tmp_path):
    """bench/device_queue.sh: the first call starts the queue and returns after its wait; later calls print only
    what is new, copy the log to $OUT, and say when the queue is done."""
    import os
    import subprocess

    queue = tmp_path / "q.txt"
    queue.write_text("# a comment\necho one\n\nsleep 5; echo two; false\necho three\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "QUEUE": str(queue), "QUEUE_STATE": str(tmp_path / "state"), "OUT": str(out)}
    script = Path(__file__).parents[1] / "bench" / "device_queue.sh"

    def call(wait: int) -> str:
        return subprocess.run(["bash", str(script), str(wait)], env=env, capture_output=True, text=True,
                              timeout=60).stdout

    first = call(2)
    assert first.endswith("queue: running\n")  # the second command sleeps longer than that
    second = call(30)
    assert second.endswith("queue: done\n")
    log = (out / "queue.log").read_text()
    # every line once, across the two calls: the second printed only what came after the first
    assert first.removesuffix("queue: running\n") + second.removesuffix("queue: done\n") == log
    assert "comment" not in log and log.count("### ") == 6 and log.count("\none\n") == 1
    assert "exit 1: sleep 5; echo two; false" in log and log.index("two\n") < log.index("three\n")
    assert call(1) == "queue: done\n"


@pytest.mark.parametrize("arch", sorted(lora_bench.ARCHS))
def test_every_bench_architecture_builds_and_has_its_lora_targets(arch):
    """What the device runs first: the public config builds (on the meta device, no memory) and every LoRA target
    the bench asks for is a module of it; the useful FLOPs count its matmuls."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(lora_bench._config(arch))
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(lora_bench.targets(arch)) <= names
    params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    assert 4 * params <= lora_bench._useful_flops_per_token(arch, 2048) < 4 * params * 1.5 + 4e10


def test_a_packed_bench_row_holds_its_examples_back_to_back():
    positions, bounds = lora_bench.packed_row(8192, 16)
    assert len(positions) == 8192 and len(bounds) == 17 and bounds[0] == 0 and bounds[-1] == 8192
    assert all(s < e for s, e in zip(bounds, bounds[1:]))  # no empty example
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert starts == bounds[:-1]  # the positions restart exactly at each example's start
    assert lora_bench.packed_row(8192, 16) == (positions, bounds)  # seeded: every stack gets the same row
    # attention FLOPs: each example over itself, far fewer than over the whole row
    context = lora_bench._context(8192, 16)
    assert context == sum((e - s) ** 2 for s, e in zip(bounds, bounds[1:])) / 8192 and 8192 / 16 <= context < 8192
    assert lora_bench._context(8192, 0) == 8192


def test_the_table_flags_a_tunery_row_whose_steps_ran_without_graphs():
    base = {"arch": "llama-1b", "bs": 4, "seq": 2048, "quant": "bf16", "tok_s": 100, "peak_gib": 1.0}
    rows = [{**base, "stack": "tunery", "graphs": "off: capture failed: RuntimeError: x"},
            {**base, "stack": "unsloth", "tok_s": 80},
            {**base, "arch": "qwen-0.5b", "stack": "tunery", "graphs": "1 captured"}]
    lines = lora_bench._table(rows).splitlines()[2:]
    assert "| tunery (eager: graphs off) | 100 |" in lines[0] and "1.25x speed" in lines[0]
    assert "| tunery | 100 |" in lines[2]
