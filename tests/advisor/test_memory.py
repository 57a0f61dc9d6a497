"""The memory and time model against the peaks and speeds bench/lora_bench.py measured (docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from tunery.advisor.memory import predict_peak
from tunery.advisor.recorded import RECORDED
from tunery.advisor.shape import shape_of
from tunery.advisor.speed import tokens_per_second
from tunery.jobs.flavors import flavors
from tunery.models.catalog import bench_shapes, family_of

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shape(name: str):
    model_type, _, values = bench_shapes()[name]
    return shape_of(model_type, values), family_of(model_type)


@pytest.mark.parametrize("row", RECORDED, ids=lambda r: r.row)
def test_predicted_peak_within_15_percent_or_1_gib_of_measured(row):
    shape, family = _shape(row.shape)
    peak = predict_peak(shape, "qlora" if row.quant else "lora", row.batch, row.seq,
                        lora_targets=family.lora_targets).gib
    assert abs(peak - row.peak_gib) <= max(0.15 * row.peak_gib, 1.0), (peak, row.peak_gib)


def test_recorded_rows_are_the_bench_rows_and_the_documented_peaks():
    bench = _load("lora_bench")
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    for r in RECORDED:
        if r.row in bench.ROWS:
            assert bench.ROWS[r.row] == (r.shape, r.batch, r.seq, r.quant)
        else:
            arch, seq, _ = bench.PACKED[r.row]
            assert (arch, 1, seq, "") == (r.shape, r.batch, r.seq, r.quant)
        # the peak and the tokens/s appear in the docs (peaks written 16.00 or 16.0, tok/s with commas)
        assert re.search(rf"\b{r.peak_gib:.2f}\b|\b{r.peak_gib:g}\b", doc), r
        assert f"{r.tok_s:,}" in doc, r


def test_the_parts_move_the_right_way():
    shape, family = _shape("llama-8b")
    lora = predict_peak(shape, "lora", 2, 2048).gib
    assert predict_peak(shape, "qlora", 2, 2048).gib < 0.5 * lora
    assert predict_peak(shape, "full", 2, 2048).gib > 3 * lora  # 8 bytes a weight more than LoRA's 2
    assert predict_peak(shape, "lora", 4, 2048).gib > lora
    assert predict_peak(shape, "lora", 2, 2048, checkpointing=False).gib > lora + 5
    assert predict_peak(shape, "lora", 2, 2048, fused_loss=False).gib > lora + 3  # 4k x 128k logits


def test_the_8bit_optimizer_keeps_a_byte_a_moment():
    shape, family = _shape("llama-8b")
    lora = shape.lora_params(16, family.lora_targets)
    for method, count, saved in (("lora", lora, 6), ("full", shape.params, 2)):
        plain = predict_peak(shape, method, 1, 4096, lora_targets=family.lora_targets).parts["trained"]
        eight = predict_peak(shape, method, 1, 4096, lora_targets=family.lora_targets,
                             optimizer="adamw_8bit").parts["trained"]
        assert (plain - eight) * 2**30 == pytest.approx(count * saved), method


def test_time_model_reproduces_the_h100_rows_and_scales_to_slower_gpus():
    h100, a10g = flavors()["h100"], flavors()["a10g-small"]
    for r in RECORDED:
        if r.gpu == "H100" and r.seq == 2048:  # the calibration rows, 4-bit included
            shape, _ = _shape(r.shape)
            tps = tokens_per_second(shape, h100, "qlora" if r.quant else "lora", r.seq, r.batch)
            assert tps == pytest.approx(r.tok_s, rel=0.02), r.row
    shape, _ = _shape("llama-8b")
    assert tokens_per_second(shape, a10g, "lora", 2048, 2) < tokens_per_second(shape, h100, "lora", 2048, 2) / 10


def test_memory_model_script_prints_every_row_and_reads_a_bench_output(tmp_path, capsys):
    script = _load("memory_model")
    rows = script.compare(script.measured_rows(None))
    assert len(rows) == len(RECORDED) and all(r["ok"] for r in rows)
    out = tmp_path / "bench.jsonl"
    out.write_text(json.dumps({"stack": "tunery", "arch": "llama-8b", "bs": 2, "seq": 2048, "quant": "4bit",
                               "err": None, "peak_gib": 30.0}) + "\n"
                   + json.dumps({"stack": "hf", "arch": "llama-8b", "bs": 2, "seq": 2048, "quant": "bf16",
                                 "err": None, "peak_gib": 22.4}) + "\n"
                   + json.dumps({"stack": "tunery -varlen_attention", "arch": "llama-1b", "bs": 1, "seq": 8192,
                                 "quant": "bf16, 16 examples packed", "err": None, "peak_gib": 3.93}) + "\n")
    (row,) = script.compare(script.measured_rows(str(out)))
    assert row["weights"] == "4bit" and not row["ok"]  # a wrong measurement is caught, HF's row is skipped
