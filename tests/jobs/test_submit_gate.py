"""`tunery submit` runs training's data gate before queueing: data that training would refuse is refused at once,
with the same reasons, and no job or run folder is left; allow_data_issues lets it through."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from tunery.cli.app import app
from tunery.errors import DataError
from tunery.models.tiny import TinySpec, build_tiny_model


def test_submit_refuses_what_training_would_refuse(tmp_path):
    model = build_tiny_model(tmp_path / "model", ["Say it."], TinySpec(hidden_size=32, intermediate_size=64,
                                                                        num_layers=1, num_heads=2, num_kv_heads=1))
    rows = [{"prompt": f"Say {i}.", "completion": f"{i}"} for i in range(4)] + [{"prompt": "?"}] * 6
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"model": str(model), "data": str(data), "output_dir": str(tmp_path / "runs"),
                                      "max_steps": 1}))
    env = {"TUNERY_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["submit", "--config", str(config), "--name", "gated", "--no-worker"], env=env)
    error = str(result.exception)  # DataError: tunery's main prints it as "error: ..." with status 2
    assert isinstance(result.exception, DataError) and "6 of 10 rows were rejected" in error, result.output
    assert "--allow-data-issues" in error
    assert not (tmp_path / "runs" / "gated").exists()
    listing = CliRunner().invoke(app, ["jobs"], env=env)
    assert "gated" not in listing.output

    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "allow_data_issues": True}))
    result = CliRunner().invoke(app, ["submit", "--config", str(config), "--name", "gated", "--no-worker"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "gated" / "config.yaml").exists()
