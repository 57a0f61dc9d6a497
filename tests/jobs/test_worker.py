"""Worker and money details that a person reads: signal names, amounts under a cent, a failed job's cause."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest

from tunery.errors import TuneryError
from tunery.jobs.flavors import money, parse_duration
from tunery.jobs.store import JobStore
from tunery.jobs.worker import LocalWorker, _Running


def test_money_never_rounds_a_real_amount_to_zero():
    assert money(0) == "$0.00" and money(12.345) == "$12.35" and money(1234.5) == "$1,234.50"
    assert money(0.004) == "$0.004" and money(0.00012) == "$0.00012"


def test_a_zero_timeout_is_refused_not_read_as_none():
    with pytest.raises(TuneryError, match="under one second"):
        parse_duration("0s")
    assert parse_duration("90") == 90 and parse_duration("1.5m") == 90


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNERY_HOME", str(tmp_path))
    return JobStore(tmp_path / "jobs.sqlite")


def _running_job(store, tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    store.add(name="x", model="m", backend="local", flavor="local", run_dir=str(run), timeout_s=None,
              budget_usd=None, usd_per_hour=0.0, estimate=None, secret_names=[])
    return store.claim("w"), run


def test_a_training_killed_by_a_signal_is_named(store, tmp_path):
    job, run = _running_job(store, tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    proc.wait()
    LocalWorker(store)._finish(_Running(job, proc, 0, io.StringIO()), proc.returncode)
    reason = store.transitions(job.id)[-1]["reason"]
    assert store.get(job.id).state == "failed" and "killed by SIGKILL" in reason, reason


def test_show_prints_the_cause_a_failed_job_logged(store, tmp_path):
    from typer.testing import CliRunner

    from tunery.cli.app import app

    job, run = _running_job(store, tmp_path)
    (run / "job.log").write_text("loading\n" * 30 + "ValueError: max_seq_len is larger than the model's context\n")
    store.set_state(job.id, "failed", "tunery train exited with status 1", expect=("running",), returncode=1)
    result = CliRunner().invoke(app, ["jobs", "show", job.id], env={"TUNERY_HOME": str(tmp_path), "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "ValueError: max_seq_len is larger" in result.output and result.output.count("loading") <= 15


def test_the_worker_watches_remote_jobs_and_stops_one_past_its_budget(store, tmp_path, monkeypatch):
    """Nobody reads the store meanwhile: the worker's own refresh stops the remote job through its backend."""
    import tunery.jobs.backends as backends

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    job = store.add(name="r", model="m", backend="ray", flavor="a10g-small", run_dir=str(run), timeout_s=None,
                    budget_usd=0.000001, usd_per_hour=1.0, estimate=None, secret_names=[])
    store.set_state(job.id, "running", "submitted", external_id="http://head#s-1", attempts=1,
                    attempt_started=time.time() - 60)
    stopped = []

    class Client:
        def get_job_status(self, submission):
            return "JobStatus.RUNNING"

        def stop_job(self, submission):
            stopped.append(submission)

    ray = backends.RayBackend(store=store)
    monkeypatch.setattr(ray, "_client", lambda address=None: Client())
    monkeypatch.setattr(backends, "get_backend", lambda name, **_: ray)
    LocalWorker(store, slots=1, poll_s=0.05).run(exit_when_idle=0.2)  # returns once nothing runs any more
    job = store.get(job.id)
    assert stopped == ["s-1"] and job.state == "cancelled", (stopped, job.state)
    assert "budget" in store.transitions(job.id)[-1]["reason"] and job.used_s >= 60
