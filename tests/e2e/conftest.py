"""Shared pieces of the end-to-end tests: a tiny model + data built offline, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of

ASSETS = Path(__file__).resolve().parents[2] / "tunery" / "assets" / "dates.jsonl"


def run_cli(*args: str, home: Path, check: bool = True, timeout: int = 600, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `tunery ARGS` as a real subprocess (offline, TUNERY_HOME=home; `env`: more variables; in `cwd`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_HOME": str(home), "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tunery.cli.app", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunery {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict:
    """A tiny Qwen2 model and a 200-row slice of the bundled date task, written once per session."""
    root = tmp_path_factory.mktemp("e2e")
    rows = [json.loads(line) for line in ASSETS.read_text().splitlines()[:200]]
    data = root / "dates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_tiny_model(root / "model", corpus_of(rows),
                             TinySpec(hidden_size=64, intermediate_size=192, num_layers=2, vocab_size=400))
    return {"root": root, "data": data, "model": model, "home": root / "home"}


def train_args(ws: dict, name: str, *extra: str) -> list[str]:
    return ["train", "--model", str(ws["model"]), "--data", str(ws["data"]), "--output-dir",
            str(ws["root"] / "runs"), "--name", name, "--max-seq-len", "64", "--batch-size", "8", "--lr", "3e-3",
            "--lora-r", "16", "--lora-alpha", "32", "--scheduler", "linear", "--eval-samples", "20",
            "--max-new-tokens", "12", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
