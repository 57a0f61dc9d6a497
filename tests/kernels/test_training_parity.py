"""50 training steps with the fast path draw the reference loss curve within 1% (bf16, on the GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

DATA = Path(__file__).resolve().parents[2] / "tunery" / "assets" / "dates.jsonl"


@pytest.mark.parametrize("method, checkpointing, compiled", [("lora", False, True), ("lora", True, True),
                                                             ("qlora", True, True), ("lora", True, False)])
def test_fast_and_reference_loss_curves_agree_over_50_steps(tmp_path, monkeypatch, method, checkpointing, compiled):
    """With checkpointing the fast path also offloads block inputs, skips the recompute's down projection and
    (lora) keeps attention from forward in pinned memory; qlora runs the fused op on NF4 weights dequantized
    inside the compiled blocks. Uncompiled: what a run too short to repay compiling gets by default (and so does
    this one: compile is set here, both ways)."""
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the device")
    from tunery.config import RunConfig
    from tunery.data.load import load_rows
    from tunery.kernels.options import FastPathOptions
    from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of
    from tunery.train.loop import train

    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    options = dict(stash_max_bytes_per_gflop=float("inf"),  # the tiny model would not stash
                   offload_keep_bytes=0, compile=compiled)  # and its tensors would all stay on the GPU
    model = build_tiny_model(tmp_path / "m", corpus_of(load_rows(DATA)),
                             TinySpec(family="llama", hidden_size=256, intermediate_size=768, num_layers=4))
    curves = {}
    for fast in (False, True):
        cfg = RunConfig(model=str(model), data=str(DATA), output_dir=str(tmp_path / "runs"), name=f"fast-{fast}",
                        max_steps=50, batch_size=16, lr=1e-3, lora_dropout=0.0, max_seq_len=64, save_every=0,
                        dtype="bf16", device="cuda", fast=fast, method=method,
                        gradient_checkpointing=checkpointing, fast_path=FastPathOptions(**options))
        run = train(cfg)
        curves[fast] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run / "result.json").read_text())
    assert ("torch.compile of each block" in result["engine"]["fast_path"]) == compiled
    ref, got = curves[False], curves[True]
    assert len(ref) == len(got) == 50 and ref[-1] < 0.5 * ref[0]
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    assert worst < 0.01, worst
