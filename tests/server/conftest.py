"""The console under FastAPI's TestClient: an app over a fresh TUNERY_HOME, and jobs written straight into its
store (no worker runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tunery.config import RunConfig
from tunery.jobs.store import Job, JobStore
from tunery.server.app import create_app


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("TUNERY_HOME", str(home))  # create_app sets it too: restored after the test
    return home


@pytest.fixture
def client(home: Path) -> TestClient:
    return TestClient(create_app(home, upload_limit=2**20), base_url="http://localhost")


def fake_job(home: Path, name: str, state: str = "succeeded", steps: int = 0, total: int = 10,
             model: str = "Qwen/Qwen2.5-0.5B-Instruct") -> Job:
    """A job in the store with a run folder holding its config and `steps` metrics lines (nothing trains)."""
    store = JobStore(home / "jobs.sqlite")
    run = home / "runs" / name
    run.mkdir(parents=True)
    RunConfig(model=model, data="data.jsonl", name=name).to_yaml(run / "config.yaml")
    job = store.add(name=name, model=model, backend="local", flavor="local", run_dir=str(run), timeout_s=None,
                    budget_usd=None, usd_per_hour=0.0, estimate="estimate: ~1 min", secret_names=[])
    write_metrics(run, range(1, steps + 1), total)
    if steps:
        store.ingest_metrics(job)
    if state != "queued":
        store.set_state(job.id, state, "set by the test")
    return store.get(job.id)


def write_metrics(run: Path, steps, total: int) -> None:
    with open(run / "metrics.jsonl", "a") as fh:
        for step in steps:
            fh.write(json.dumps({"step": step, "total_steps": total, "loss": 3.0 / step, "lr": 1e-3,
                                 "tokens_per_s": 100.0}) + "\n")


REVIEWS = [("great", "positive"), ("awful", "negative"), ("lovely", "positive"), ("boring", "negative")]


def alpaca_rows(n: int = 40) -> list[dict]:
    """Alpaca rows of a small sentiment task, all different."""
    things = ["film", "book", "meal", "hotel", "song"]
    return [{"instruction": "Is this review positive or negative?",
             "input": f"The {things[i % 5]} number {i} was {REVIEWS[i % 4][0]}.", "output": REVIEWS[i % 4][1]}
            for i in range(n)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", corpus_of(alpaca_rows()),
                            TinySpec(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                     vocab_size=300))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model) -> Path:
    """A finished 6-step LoRA run of the tiny model on the review rows (trained here, in this process)."""
    from tunery.train import train

    root = tmp_path_factory.mktemp("trained")
    data = root / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(40)))
    cfg = RunConfig(model=str(tiny_model), data=str(data), output_dir=str(root / "runs"), name="tiny-run",
                    max_steps=6, batch_size=4, max_seq_len=64, eval_samples=4, max_new_tokens=4, save_every=0)
    return train(cfg)
