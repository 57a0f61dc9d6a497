"""Smaller CLI paths: doctor, YAML config with flag overrides, full fine-tuning, packing, data inspect exit
codes."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import metrics, run_cli, train_args

pytestmark = pytest.mark.slow


def test_doctor_reports_torch_and_device(tmp_path):
    import torch

    proc = run_cli("doctor", home=tmp_path)
    out = proc.stdout + proc.stderr
    assert torch.__version__.split("+")[0] in out and "CUDA available" in out and "TUNERY_HOME" in out


def test_yaml_config_with_flag_override_is_written_into_the_run(workspace, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(workspace["model"]), "data": str(workspace["data"]),
                                   "output_dir": str(tmp_path / "runs"), "name": "yaml", "max_steps": 3,
                                   "lr": 1e-3, "max_seq_len": 64, "batch_size": 4}))
    run_cli("train", "--config", str(cfg), "--lr", "5e-4", "--lora-r", "4", "--no-fast-compile",
            "--fast-capture-after", "3", home=workspace["home"])
    run = tmp_path / "runs" / "yaml"
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["lr"] == 5e-4 and written["lora_r"] == 4 and written["max_steps"] == 3
    # the fast path's options: given ones changed, the rest at their defaults, recorded where the run says so
    assert written["fast_path"]["compile"] is False and written["fast_path"]["capture_after"] == 3
    assert written["fast_path"]["offload"] is True
    assert json.loads((run / "manifest.json").read_text())["fast_path"] == written["fast_path"]
    assert json.loads((run / "result.json").read_text())["engine"]["fast_path_options"] == written["fast_path"]
    assert [m["step"] for m in metrics(tmp_path / "runs" / "yaml")] == [1, 2, 3]

    cfg.write_text(yaml.safe_dump({"model": "x", "data": "y", "learning_rate": 1e-3}))
    proc = run_cli("train", "--config", str(cfg), home=workspace["home"], check=False)
    assert proc.returncode == 2 and "learning_rate" in proc.stderr


def test_full_fine_tune_writes_a_model_folder_that_eval_and_export_use(workspace, tmp_path):
    run_cli(*train_args(workspace, "full", "--method", "full", "--max-steps", "6", "--lr", "1e-3"),
            home=workspace["home"])
    run = workspace["root"] / "runs" / "full"
    assert (run / "model" / "config.json").exists() and not (run / "adapter").exists()
    run_cli("eval", str(run), "--samples", "4", home=workspace["home"])
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["fine_tuned"]["loss"] < report["base"]["loss"]
    run_cli("export", str(run), "--merged", str(tmp_path / "merged"), home=workspace["home"])
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_packing_trains_and_the_loss_falls(workspace):
    run_cli(*train_args(workspace, "packed", "--packing", "--max-steps", "30"), home=workspace["home"])
    run = workspace["root"] / "runs" / "packed"
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["packing"] is True
    losses = [m["loss"] for m in metrics(run)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert len(losses) == 30 and last <= 0.7 * first, f"loss fell only from {first:.3f} to {last:.3f}"


def test_data_inspect_exits_non_zero_when_nothing_would_train(workspace, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 200, "completion": "answer"}) + "\n")
    proc = run_cli("data", "inspect", str(data), "--model", str(workspace["model"]), "--max-seq-len", "32",
                   home=workspace["home"], check=False)
    assert proc.returncode == 1 and "problem" in proc.stdout + proc.stderr


def test_qlora_trains_adapters_on_a_4bit_base_and_eval_reads_them(workspace):
    pytest.importorskip("bitsandbytes", reason="the qlora extra is installed by `make test`")
    run_cli(*train_args(workspace, "qlora", "--method", "qlora", "--max-steps", "8", "--lr", "2e-3",
                        "--lora-dropout", "0"), home=workspace["home"])
    run = workspace["root"] / "runs" / "qlora"
    rows = metrics(run)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run / "adapter" / "adapter_model.safetensors").exists() and not (run / "model").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "qlora"
    run_cli("eval", str(run), "--samples", "4", home=workspace["home"])
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["fine_tuned"]["loss"] < report["base"]["loss"]


def test_a_run_trained_with_relative_paths_evaluates_from_anywhere_and_refuses_changed_data(workspace, tmp_path):
    """config.yaml holds absolute paths; eval checks the data file against the sha256 the manifest recorded."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(workspace["data"], work / "data.jsonl")
    run_cli("train", "--model", str(workspace["model"]), "--data", "data.jsonl", "--output-dir", "runs", "--name",
            "rel", "--max-steps", "3", "--max-seq-len", "64", "--eval-samples", "2", "--max-new-tokens", "4",
            home=workspace["home"], cwd=work)
    run = work / "runs" / "rel"
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["data"] == str(work / "data.jsonl") and written["output_dir"] == str(work / "runs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_cli("eval", str(run), home=workspace["home"], cwd=elsewhere)
    with open(work / "data.jsonl", "a") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "new"},
                                          {"role": "assistant", "content": "row"}]}) + "\n")
    proc = run_cli("eval", str(run), home=workspace["home"], cwd=elsewhere, check=False)
    assert proc.returncode == 2 and "has changed since the run trained on it" in proc.stderr
    assert "Traceback" not in proc.stderr
    run_cli("eval", str(run), "--allow-changed-data", home=workspace["home"], cwd=elsewhere)
