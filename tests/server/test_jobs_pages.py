"""The runs and jobs page, one job's page, and its live stream (only new bytes each tick)."""

from __future__ import annotations

import json

from tunery.jobs.store import JobStore
from tunery.server.tail import Tail

from .conftest import fake_job, write_metrics


def test_jobs_page_lists_jobs_with_state_progress_loss_and_sparkline(client, home):
    job = fake_job(home, "alpha", state="succeeded", steps=10)
    fake_job(home, "beta", state="queued")
    page = client.get("/")
    assert page.status_code == 200
    assert job.id in page.text and "alpha" in page.text and "beta" in page.text
    assert "10/10" in page.text and "0.3000" in page.text  # progress and last loss
    assert "<svg class=\"spark\"" in page.text
    rows = client.get("/api/jobs").json()
    assert {r["name"] for r in rows} == {"alpha", "beta"}


def test_a_run_folder_without_a_job_is_listed_too(client, home):
    from tunery.config import RunConfig

    run = home / "runs" / "cli-run"
    run.mkdir(parents=True)
    RunConfig(model="m", data="d.jsonl", name="cli-run").to_yaml(run / "config.yaml")
    write_metrics(run, range(1, 5), 4)
    (run / "result.json").write_text("{}")
    page = client.get("/jobs/table")
    assert "cli-run" in page.text and "finished" in page.text and "4/4" in page.text


def test_job_page_shows_summary_and_history_and_unknown_job_is_404(client, home):
    job = fake_job(home, "gamma", state="failed", steps=3)
    page = client.get(f"/jobs/{job.id}")
    assert page.status_code == 200 and "gamma" in page.text and "set by the test" in page.text
    assert "Retry" in page.text and "Cancel" not in page.text
    assert client.get("/jobs/nope").status_code == 404


def test_cancel_from_the_console_cancels_a_queued_job_in_the_store(client, home):
    job = fake_job(home, "delta", state="queued")
    response = client.post(f"/jobs/{job.id}/cancel")
    assert response.status_code == 200 and "cancelled" in response.text
    assert JobStore(home / "jobs.sqlite").get(job.id).state == "cancelled"
    done = fake_job(home, "done", state="succeeded")
    again = client.post(f"/jobs/{done.id}/cancel", headers={"HX-Request": "true"})
    assert again.status_code == 400 and "already ended" in again.text


def _events(client, job_id: str, cursor: str | None = None) -> list[tuple[str, str, object]]:
    headers = {"Last-Event-ID": cursor} if cursor else {}
    text = client.get(f"/api/jobs/{job_id}/events?tick=0.1", headers=headers).text
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        out.append((fields["event"], fields["id"], json.loads(fields["data"])))
    return out


def test_event_stream_sends_metrics_then_ends_and_resumes_from_its_cursor(client, home):
    job = fake_job(home, "eps", state="succeeded", steps=5)
    (home / "runs" / "eps" / "job.log").write_text("step 1\nstep 5\n")
    events = _events(client, job.id)
    kinds = [e[0] for e in events]
    assert kinds[-1] == "end" and "state" in kinds and "log" in kinds
    metrics = [r["step"] for kind, _, data in events if kind == "metrics" for r in data]
    assert metrics == [1, 2, 3, 4, 5]
    cursor = next(i for kind, i, _ in events if kind == "metrics")
    write_metrics(home / "runs" / "eps", [6, 7], 10)
    resumed = _events(client, job.id, cursor)
    assert [r["step"] for kind, _, data in resumed if kind == "metrics" for r in data] == [6, 7]


def test_tail_reads_only_the_bytes_appended_since_its_last_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write = lambda text: path.open("a").write(text)  # noqa: E731
    write('{"step": 1}\n{"step": 2}\n{"step": 3')  # the last line is still being written
    tail = Tail(path)
    data, reset = tail.read()
    assert data == b'{"step": 1}\n{"step": 2}\n' and not reset
    first = tail.bytes_read
    write('}\n{"step": 4}\n')
    data, _ = tail.read()
    assert data == b'{"step": 3}\n{"step": 4}\n'
    assert tail.bytes_read - first == len(b'{"step": 3}\n{"step": 4}\n')  # not the file again
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"step": 1}\n')
    replacement.replace(path)  # a resume rewrites the file under a new inode
    data, reset = tail.read()
    assert reset and data == b'{"step": 1}\n'


def test_a_sparkline_is_read_again_only_when_its_job_moved(client, home, monkeypatch):
    done = fake_job(home, "done", state="succeeded", steps=10)
    moving = fake_job(home, "moving", state="queued", steps=3)
    client.get("/jobs/table")
    asked: list = []
    original = JobStore.loss_curves
    monkeypatch.setattr(JobStore, "loss_curves", lambda self, ids=None, points=24: asked.append(ids) or
                        original(self, ids, points))
    client.get("/jobs/table")
    assert asked == []  # nothing moved: nothing read
    write_metrics(home / "runs" / "moving", [4, 5], 10)
    JobStore(home / "jobs.sqlite").ingest_metrics(moving)
    page = client.get("/jobs/table")
    assert asked == [[moving.id]] and done.id not in asked[0]
    assert "5/10" in page.text and "0.6000" in page.text


def test_retry_from_the_console_queues_the_job_again_with_a_new_timeout(client, home, monkeypatch):
    monkeypatch.setattr("tunery.jobs.submit.ensure_worker", lambda *a, **k: False)
    job = fake_job(home, "zeta", state="failed", steps=2)
    response = client.post(f"/jobs/{job.id}/retry", data={"timeout": "45m", "budget": ""})
    assert response.status_code == 200 and "queued again" in response.text
    again = JobStore(home / "jobs.sqlite").get(job.id)
    assert again.state == "queued" and again.timeout_s == 45 * 60
    (home / "runs" / "zeta" / "job.log").write_text("the whole log\n")
    assert client.get(f"/jobs/{job.id}/log").text == "the whole log\n"
