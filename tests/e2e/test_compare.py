"""`tunery compare --models`: two tiny models of different sizes queued as jobs on the bundled date task, on one
split; the leaderboard ranks them by their measured metric, on exactly the same held-out rows."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunery.cli.app import app
from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of

pytestmark = pytest.mark.slow


def test_compare_two_models_on_one_split(workspace, tmp_path, monkeypatch):
    rows = [json.loads(line) for line in workspace["data"].read_text().splitlines()[:48]]
    data = tmp_path / "dates-48.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = build_tiny_model(tmp_path / "small", corpus_of(rows), TinySpec(hidden_size=32, intermediate_size=64,
                                                                           num_layers=1, num_heads=2,
                                                                           num_kv_heads=1, vocab_size=400))
    settings = tmp_path / "shared.yaml"
    settings.write_text(yaml.safe_dump({"max_new_tokens": 12, "eval_samples": 6, "lr": 3e-3, "lora_r": 16,
                                        "lora_alpha": 32, "scheduler": "linear", "save_every": 0}))
    out = tmp_path / "cmp"
    # compare runs here (typer's runner); its jobs run as `tunery train` processes of a background worker
    monkeypatch.setenv("TUNERY_HOME", str(workspace["home"]))
    proc = CliRunner().invoke(app, ["compare", "--models", str(workspace["model"]), str(small), "--data", str(data),
                                    "--config", str(settings), "--max-steps", "15", "--batch-size", "8",
                                    "--max-seq-len", "64", "--eval-split", "0.25", "--output-dir",
                                    str(tmp_path / "runs"), "--out", str(out), "--wait"], env={"COLUMNS": "220"})
    assert proc.exit_code == 0, repr(proc.exception)
    listing = json.loads((out / "compare.json").read_text())
    assert listing["held_out_rows"] == 12 and len(listing["runs"]) == 2
    reports = [json.loads((tmp_path / "runs" / r.rsplit("/", 1)[-1] / "eval" / "report.json").read_text())
               for r in listing["runs"]]
    # both runs evaluated on exactly the same held-out rows: the split file's, whatever their tokenizers
    assert reports[0]["held_out_sha256"] == reports[1]["held_out_sha256"]
    assert reports[0]["eval_examples"] == reports[1]["eval_examples"] == 12
    assert [r["prompt"] for r in reports[0]["examples"]] == [r["prompt"] for r in reports[1]["examples"]]
    for run in listing["runs"]:  # same seed and settings; only the model differs
        cfg = yaml.safe_load((tmp_path / "runs" / run.rsplit("/", 1)[-1] / "config.yaml").read_text())
        assert (cfg["seed"], cfg["max_steps"], cfg["eval_data"]) == (42, 15, str(out / "heldout.jsonl"))
    # ranked by the measured metric (exact match, then held-out loss)
    measured = sorted((-r["fine_tuned"]["exact_match"], r["fine_tuned"]["loss"], r["run"]) for r in reports)
    report = (out / "report.md").read_text()
    first, second = (m[2].rsplit("/", 1)[-1] for m in measured)
    assert report.index(f"| 1 | {first} |") < report.index(f"| 2 | {second} |")
    assert "same 12 held-out rows" in report and "![loss curves](loss.png)" in report
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "leaderboard" in proc.stdout and first in proc.stdout
