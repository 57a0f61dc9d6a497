"""The advisor end to end on tiny models: `tunery plan`'s recommended command runs as printed; a model saved in
4 bits (a pre-quantized checkpoint) trains as QLoRA and refuses any other method. The CLI runs in this process
(typer's runner): each `tunery` subprocess would spend most of these tests' time importing torch."""

from __future__ import annotations

import json
import shlex

import pytest
from typer.testing import CliRunner

from tunery.advisor.models import describe
from tunery.cli.app import app
from tunery.config import ConfigError, RunConfig
from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of
from tunery.train.loop import check_method

from .conftest import ASSETS

pytestmark = pytest.mark.slow


def test_the_recommended_command_runs(workspace, tmp_path, monkeypatch):
    data = tmp_path / "dates-40.jsonl"  # 40 rows: 3 epochs of 36 training rows, a short run
    data.write_text("".join(workspace["data"].read_text().splitlines(keepends=True)[:40]))
    monkeypatch.setenv("TUNERY_HOME", str(workspace["home"]))
    shown = CliRunner().invoke(app, ["plan", "--data", str(data), "--model", str(workspace["model"]), "--flavor",
                                     "local", "--json"])
    assert shown.exit_code == 0, repr(shown.exception)
    plan = json.loads(shown.stdout)
    assert plan["kind"] == "instruct" and plan["data"]["measured"]  # chat rows; lengths from the tiny tokenizer
    (candidate,) = plan["candidates"]
    args = shlex.split(candidate["command"])
    assert args[:2] == ["tunery", "train"] and plan["epochs"] == 3
    args = ["train", *args[2:]]
    monkeypatch.chdir(tmp_path)  # the command's run folder goes under ./runs, as for a user
    trained = CliRunner().invoke(app, [*args, "--name", "planned"])  # the printed command, this process
    assert trained.exit_code == 0, repr(trained.exception)
    result = json.loads((tmp_path / "runs" / "planned" / "result.json").read_text())
    assert result["steps"] == -(-36 * 3 // 8)  # 36 training rows, an effective batch of 8, 3 epochs


def test_a_checkpoint_saved_in_4_bits_trains_as_qlora(tmp_path, monkeypatch):
    import torch
    import transformers

    rows = [json.loads(line) for line in ASSETS.read_text().splitlines()[:40]]
    data = tmp_path / "dates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = build_tiny_model(tmp_path / "base", corpus_of(rows),
                            TinySpec(hidden_size=64, intermediate_size=192, num_layers=2, vocab_size=400))
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)
    folder = tmp_path / "tiny-bnb-4bit"
    transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=quant,
                                                      device_map={"": "cpu"}).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    info = describe(str(folder))
    assert info.prequantized and info.family == "qwen" and not info.supports["gguf"]
    with pytest.raises(ConfigError, match="stored in 4 bits"):
        check_method(RunConfig(model=str(folder), data=str(data), method="lora"))
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    trained = CliRunner().invoke(app, ["train", "--model", str(folder), "--data", str(data), "--output-dir",
                                       str(tmp_path / "runs"), "--max-steps", "3", "--batch-size", "4",
                                       "--max-seq-len", "64", "--eval-split", "0", "--method", "qlora", "--name", "q"])
    assert trained.exit_code == 0, repr(trained.exception)
    assert (tmp_path / "runs" / "q" / "adapter" / "adapter_model.safetensors").is_file()
