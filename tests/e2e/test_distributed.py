"""`--gpus 2` on CPU: two gloo processes under torchrun draw the single-process loss curve."""

from __future__ import annotations

import pytest

from .conftest import metrics, run_cli, train_args

pytestmark = pytest.mark.slow


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(workspace):
    common = ("--max-steps", "12", "--lora-dropout", "0", "--eval-every", "6")
    run_cli(*train_args(workspace, "ddp", *common), "--gpus", "2", "--batch-size", "4", home=workspace["home"])
    run_cli(*train_args(workspace, "single", *common), "--batch-size", "8", home=workspace["home"])
    runs = workspace["root"] / "runs"
    ddp, single = metrics(runs / "ddp"), metrics(runs / "single")
    assert [m["step"] for m in ddp] == list(range(1, 13))  # one writer: rank 0
    for a, b in zip(single, ddp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    assert ddp[-1]["eval_loss"] == pytest.approx(single[-1]["eval_loss"], rel=1e-4)
    assert ddp[0]["loss"] > ddp[-1]["loss"]
    assert "gpus: 2" in (runs / "ddp" / "config.yaml").read_text()
    assert (runs / "ddp" / "adapter" / "adapter_model.safetensors").exists()
