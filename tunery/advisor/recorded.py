"""The bench rows the advisor is calibrated on: tunery's peak memory and tokens/s as `bench/lora_bench.py`
measured them (docs/benchmarks.md). Peaks calibrate and test the memory model on every row; tokens/s calibrate the
time model on the H100 rows only (the matrix at b7a1166, 2026-12-06, one H100 80GB HBM3). The family rows
(gemma3-1b, phi3.5-mini, lfm2-1.2b) and the packed Llama-3.1-8B row ran on an H200 (2026-12-07): their peaks
count, their speeds do not."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRow:
    row: str  # bench/lora_bench.py's row name (ROWS, PACKED)
    shape: str  # the benchmark shape (models/catalog.py, Family.bench)
    batch: int
    seq: int
    quant: str  # "" (bf16) or "4bit"
    peak_gib: float
    tok_s: int
    gpu: str  # the GPU that measured it


RECORDED: tuple[BenchRow, ...] = (
    BenchRow("qwen-0.5b", "qwen-0.5b", 8, 2048, "", 2.31, 110_164, "H100"),
    BenchRow("llama-1b", "llama-1b", 4, 2048, "", 3.63, 64_198, "H100"),
    BenchRow("llama-8b", "llama-8b", 2, 2048, "", 16.63, 12_761, "H100"),
    BenchRow("qwen-7b", "qwen-7b", 2, 2048, "", 16.00, 12_913, "H100"),
    BenchRow("llama-8b-4bit", "llama-8b", 2, 2048, "4bit", 6.98, 11_779, "H100"),
    BenchRow("llama-8b-16k", "llama-8b", 1, 16384, "", 19.60, 10_199, "H100"),
    BenchRow("llama-1b-8k-packed", "llama-1b", 1, 8192, "", 3.68, 61_046, "H100"),
    BenchRow("gemma3-1b", "gemma3-1b", 4, 2048, "", 2.93, 53_215, "H200"),
    BenchRow("phi3.5-mini", "phi3.5-mini", 2, 2048, "", 8.19, 21_848, "H200"),
    BenchRow("lfm2-1.2b", "lfm2-1.2b", 4, 2048, "", 3.61, 72_099, "H200"),
    BenchRow("llama-8b-16k-packed", "llama-8b", 1, 16384, "", 19.79, 12_333, "H200"),
)
