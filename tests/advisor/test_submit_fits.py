"""`tunery submit` refuses a job whose predicted peak exceeds its flavor's GPU memory, and says what would fit."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunery.advisor.fits import check_fits
from tunery.cli.app import app
from tunery.config import RunConfig
from tunery.errors import TuneryError
from tunery.jobs.flavors import get_flavor


def _data(tmp_path) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q {i}", "completion": "a " * 50}) + "\n" for i in range(20)))
    return str(path)


def test_submit_refuses_a_job_that_cannot_fit_and_names_what_would(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"model": "Qwen/Qwen2.5-7B", "data": _data(tmp_path), "method": "full",
                                      "output_dir": str(tmp_path / "runs"), "max_seq_len": 1024,
                                      "gradient_checkpointing": True}))
    env = {"TUNERY_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    result = CliRunner().invoke(app, ["submit", "--config", str(config), "--flavor", "a10g-small", "--backend",
                                      "hf-jobs", "--name", "big", "--no-worker"], env=env)
    error = str(result.exception)  # a TuneryError: tunery's main prints it as "error: ..." with status 2
    assert isinstance(result.exception, TuneryError), result.output
    assert "full fine-tune needs ~" in error and "a10g-small has 24 GB a GPU" in error
    assert "--method qlora" in error and "--flavor a100-large" in error
    assert not (tmp_path / "runs" / "big").exists()


def test_what_fits_passes_and_the_suggestions_are_true(tmp_path):
    cfg = RunConfig(model="Qwen/Qwen2.5-7B", data=_data(tmp_path), method="lora", batch_size=4, max_seq_len=2048,
                    gradient_checkpointing=False)
    with pytest.raises(TuneryError) as refused:
        check_fits(cfg, get_flavor("a10g-small"))
    message = str(refused.value)
    assert "gradient_checkpointing: true" in message and "--batch-size 1 --grad-accum 4" not in message
    assert check_fits(cfg.replace(gradient_checkpointing=True), get_flavor("a10g-small")).gib < 24
    assert check_fits(cfg.replace(method="qlora", batch_size=1, max_seq_len=512), get_flavor("a10g-small")).gib < 24
    assert check_fits(cfg, get_flavor("cpu-basic")) is None  # no GPU to fit
    assert check_fits(cfg.replace(model=str(tmp_path)), get_flavor("t4-small")) is None  # no config.json here
    # the row length counts, not only max_seq_len: short rows fit where 4,096-token ones do not
    short = cfg.replace(gradient_checkpointing=True, method="qlora", batch_size=16, max_seq_len=4096)
    with pytest.raises(TuneryError):
        check_fits(short, get_flavor("t4-small"))
    assert check_fits(short, get_flavor("t4-small"), longest=256).gib < 16


def test_submit_estimates_time_with_the_advisor_model_on_a_gpu_flavor(tmp_path):
    from tunery.advisor.shape import shape_for_model
    from tunery.advisor.speed import tokens_per_second
    from tunery.jobs.submit import prepare

    cfg = RunConfig(model="Qwen/Qwen2.5-7B", data=_data(tmp_path), method="qlora", batch_size=2, max_seq_len=512,
                    output_dir=str(tmp_path / "runs"), gradient_checkpointing=True)
    _, _, est = prepare(cfg, "a10g-small", "hf-jobs")
    shape = shape_for_model("Qwen/Qwen2.5-7B")
    assert est.tokens_per_s == pytest.approx(tokens_per_second(shape, get_flavor("a10g-small"), "qlora", 512, 2))
    assert est.usd > 0 and not (tmp_path / "runs").exists()  # prepared, nothing queued
