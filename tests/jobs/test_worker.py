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


def test_the_local_flavor_is_this_machine_not_a_fixed_cpu_guess(monkeypatch):
    import torch

    from tunery.jobs.flavors import get_flavor, local_flavor, tokens_per_second

    local_flavor.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = get_flavor("local")
    assert cpu.gpus == 0 and cpu.tflops_bf16 > 0  # measured here
    # throughput falls with the model's size; a 0.5B model on a CPU is nowhere near GPU speed
    assert tokens_per_second(0.5, cpu) < tokens_per_second(0.01, cpu) < 1e7
    assert tokens_per_second(0.5, cpu) < tokens_per_second(0.5, get_flavor("t4-small")) / 10

    class Props:
        total_memory = 80 * 2**30

    local_flavor.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: Props())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = get_flavor("local")
    local_flavor.cache_clear()
    assert (gpu.gpus, gpu.tflops_bf16, gpu.gpu_memory_gb, gpu.usd_per_hour) == (1, 989, 80, 0.0)
    assert tokens_per_second(0.5, gpu) == tokens_per_second(0.5, get_flavor("h100"))


def test_a_job_environment_leaves_out_what_the_cli_defaulted(monkeypatch):
    """TOKENIZERS_PARALLELISM=false set by the worker's own CLI (the user had not) does not reach the job: the
    job's `tunery` sets its own defaults, as for the user. A value the user set is passed on."""
    import tunery
    from tunery.jobs.secrets import job_environment

    environ = {"PATH": "/bin", "TOKENIZERS_PARALLELISM": "false", "UNRELATED_TOKEN": "x"}
    monkeypatch.setattr(tunery, "DEFAULTED_ENV", {"TOKENIZERS_PARALLELISM"})
    assert job_environment(environ) == {"PATH": "/bin"}
    monkeypatch.setattr(tunery, "DEFAULTED_ENV", set())
    assert job_environment(environ) == {"PATH": "/bin", "TOKENIZERS_PARALLELISM": "false"}
