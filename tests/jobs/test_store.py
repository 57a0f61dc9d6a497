"""The job store on its own: metrics ingestion across a resume's rewrite, state transitions, claiming."""

from __future__ import annotations

import json

from tunery.jobs.store import JobStore
from tunery.train.metrics import MetricsFile


def _add(store: JobStore, run_dir) -> str:
    return store.add(name="j", model="m", backend="local", flavor="local", run_dir=str(run_dir), timeout_s=None,
                     budget_usd=None, usd_per_hour=0.0, estimate=None, secret_names=[]).id


def test_metrics_ingest_follows_a_resume_that_rewrites_the_file(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.get(_add(store, tmp_path))
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for step in range(1, 26):
        metrics.write({"step": step, "loss": 10.0 - step * 0.1, "total_steps": 40})
    metrics.close()
    cursor = store.ingest_metrics(job)
    assert [m["step"] for m in store.metrics(job.id)] == list(range(1, 26))
    # a resume from the step-20 checkpoint drops lines 21-25 and appends a new, longer history
    resumed = MetricsFile(tmp_path / "metrics.jsonl", keep_through_step=20)
    for step in range(21, 41):
        resumed.write({"step": step, "loss": 100.0 + step, "total_steps": 40, "padding": "x" * 50})
    resumed.close()
    store.ingest_metrics(job, cursor)
    rows = store.metrics(job.id)
    assert [m["step"] for m in rows] == list(range(1, 41))
    assert rows[-1]["loss"] == 140.0 and rows[21]["loss"] == 122.0
    job = store.get(job.id)
    assert job.step == 40 and job.progress == 1.0


def test_a_torn_line_is_skipped_not_fatal(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.get(_add(store, tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n", "lr": 1}\n' + json.dumps(
        {"step": 2, "loss": 1.0}) + "\n")
    store.ingest_metrics(job)
    assert [m["step"] for m in store.metrics(job.id)] == [1, 2]


def test_claim_is_atomic_and_transitions_are_recorded(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    first, second = _add(store, tmp_path / "a"), _add(store, tmp_path / "b")
    assert store.claim("w1").id == first and store.claim("w2").id == second and store.claim("w3") is None
    assert not store.set_state(first, "cancelled", "late", expect=("queued",))
    assert store.set_state(first, "succeeded", "done", expect=("running",))
    assert [t["state"] for t in store.transitions(first)] == ["queued", "running", "succeeded"]
    assert store.get(first).state == "succeeded" and store.get(second).state == "running"


def test_loss_curves_average_each_jobs_loss_into_buckets_in_one_query(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    long, short, none = (_add(store, tmp_path) for _ in range(3))
    store.add_metrics(long, [{"step": s, "loss": float(s)} for s in range(1, 101)])
    store.add_metrics(short, [{"step": s, "loss": 1.0 / s} for s in (10, 20, 30)])  # logged every 10 steps
    curves = store.loss_curves(points=10)
    assert curves[long] == [sum(range(10 * b + 1, 10 * b + 11)) / 10 for b in range(10)]
    assert curves[short] == [1.0 / 10, 1.0 / 20, 1.0 / 30] and none not in curves
    assert set(store.loss_curves([short])) == {short}
