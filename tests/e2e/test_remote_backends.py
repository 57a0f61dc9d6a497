"""Remote backends offline: a real local Ray head on 127.0.0.1, and the Hugging Face Jobs script run here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import tomllib
import yaml

from .conftest import run_cli

pytestmark = pytest.mark.slow

TOKEN = "hf_PLANTEDsecretVALUE987654321"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(ws: dict, folder: Path, **extra) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"model": str(ws["model"]), "data": str(ws["data"]),
                                    "output_dir": str(folder / "runs"), "max_steps": 10, "batch_size": 8,
                                    "max_seq_len": 64, "lr": 3e-3, **extra}))
    return path


@pytest.fixture
def ray_head(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TUNERY_HOME": str(tmp_path / "home"), "HF_TOKEN": TOKEN}
    port, dash = _free_port(), _free_port()
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    started = subprocess.run([*ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                              "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                              "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp}"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([*ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _paused_training(run: Path) -> list[int]:
    """SIGSTOP the processes training in `run` (found by their command line): the job stays mid-run, so what
    the test does next happens while it is still running, however fast the machine is."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"train" in cmd and any(str(run).encode() in part for part in cmd) and entry.name.isdigit():
            os.kill(int(entry.name), signal.SIGSTOP)
            pids.append(int(entry.name))
    return pids


def _wait_for(predicate, what: str, timeout: float = 240, tell=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\n{tell()}")


def test_ray_job_past_its_budget_is_stopped_and_its_retry_resumes_to_the_end(workspace, tmp_path, ray_head,
                                                                              monkeypatch):
    from tunery.train.checkpoint import list_checkpoints

    home, run = tmp_path / "home", tmp_path / "runs" / "on-ray"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = _config(workspace, tmp_path, max_steps=40, save_every=5)
    proc = run_cli("submit", "--config", str(config), "--name", "on-ray", "--backend", "ray", "--address", ray_head,
                   "--secret", "HF_TOKEN", "--flavor", "a10g-small", "--budget", "0.000001usd", "--yes",
                   "--no-worker", home=home)
    job_id = proc.stdout.strip().splitlines()[-1]
    _wait_for(lambda: list_checkpoints(run / "checkpoints"), "the first checkpoint")
    paused = _paused_training(run)
    assert paused, "the Ray job's training process was not found"
    try:
        show = run_cli("jobs", "show", job_id, home=home).stdout  # a read refreshes: past its budget, it is stopped
    finally:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert "cancelled" in show and "budget" in show and "stopped through the ray API" in show, show
    _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in paused), "Ray to stop the training", 120)

    run_cli("jobs", "retry", job_id, "--budget", "100usd", home=home)
    show = _wait_for(lambda: (lambda text: text if "Ray reports" in text else None)(
        run_cli("jobs", "show", job_id, home=home).stdout), "the retried job to end")
    assert "Ray reports SUCCEEDED" in show, show
    logs = run_cli("logs", job_id, home=home).stdout
    assert "resuming from step-" in logs and "done: loss" in logs and TOKEN not in logs, logs
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 40 and steps == sorted(steps)  # one run, continued: no step twice
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    for path in [*home.rglob("*"), *(tmp_path / "runs").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_hf_jobs_script_is_self_contained_and_runs_here(workspace, tmp_path):
    from tunery.config import RunConfig
    from tunery.jobs.hf_jobs import make_script

    cfg = RunConfig.from_yaml(_config(workspace, tmp_path)).replace(name="hfjob")
    script = tmp_path / "hfjob.py"
    script.write_text(make_script(cfg))
    text = script.read_text()
    block = "\n".join(line[2:] for line in text.split("# /// script\n")[1].split("# ///")[0].splitlines())
    deps = tomllib.loads(block)["dependencies"]
    assert deps[0].startswith("tunery") and any(d.startswith("transformers") for d in deps)
    assert str(workspace["data"]) not in text  # the data travels inside the script
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_HOME": str(tmp_path / "home"),
           "TUNERY_JOB_DIR": str(elsewhere / "job")}
    env.pop("TUNERY_OUTPUT_REPO", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "job" / "runs" / "hfjob" / "adapter" / "adapter_model.safetensors").exists()


@pytest.fixture
def hub(tmp_path, workspace):
    """A local Hugging Face Hub and Jobs service (tests/hubserver.py) that really runs the jobs here; it holds
    the tiny model as tester/tiny."""
    from tests.hubserver import HubServer

    root = Path(__file__).resolve().parents[2]
    server = HubServer(tmp_path / "hub", pause_on_checkpoint=True,
                       job_env={"PYTHONPATH": str(root), "TUNERY_HOME": str(tmp_path / "job-home"),
                                "HF_HUB_CACHE": str(tmp_path / "job-cache"), "TOKENIZERS_PARALLELISM": "false"})
    server.start()
    server.put_repo("tester/tiny", workspace["model"])
    try:
        yield server
    finally:
        server.stop()


def test_hf_job_pushes_checkpoints_is_stopped_past_its_budget_and_its_retry_resumes_from_the_hub(
        workspace, tmp_path, hub):
    home, run, repo = tmp_path / "home", tmp_path / "runs" / "hfrun", "tester/tunery-hfrun"
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    config = _config(workspace, tmp_path, model="tester/tiny", max_steps=60, save_every=10)
    proc = run_cli("submit", "--config", str(config), "--name", "hfrun", "--backend", "hf-jobs", "--flavor",
                   "a10g-small", "--timeout", "1h", "--budget", "0.000001usd", "--yes", "--no-worker", home=home,
                   env=env)
    job_id = proc.stdout.strip().splitlines()[-1]
    first = hub.jobs()[0]
    assert first["flavor"] == "a10g-small" and first["timeout"] == 3600, first
    assert first["secrets"] == {"HF_TOKEN": TOKEN} and first["environment"]["TUNERY_OUTPUT_REPO"] == repo
    # the service pauses the job when its first checkpoint reaches the repo: mid-run, past its budget
    _wait_for(lambda: any(p.startswith("checkpoints/step-") for p in hub.files(repo)), "the first pushed checkpoint",
              tell=lambda: hub.jobs()[0]["log"][-3000:])
    show = run_cli("jobs", "show", job_id, home=home, env=env).stdout
    assert "cancelled" in show and "budget" in show and "stopped through the hf-jobs API" in show, show
    assert "loss" in show  # the metrics pushed with the checkpoint reached the store
    _wait_for(lambda: hub.jobs()[0]["stage"] == "CANCELED", "the service to stop the job")

    run_cli("jobs", "retry", job_id, "--budget", "100usd", home=home, env=env)
    show = _wait_for(lambda: (lambda text: text if "Hugging Face Jobs reports" in text else None)(
        run_cli("jobs", "show", job_id, home=home, env=env).stdout), "the retried job to end")
    assert "Hugging Face Jobs reports COMPLETED" in show, show + hub.jobs()[-1]["log"]
    logs = run_cli("logs", job_id, home=home, env=env).stdout
    assert "pulled the run of an earlier attempt" in logs and "resuming from step-" in logs, logs
    assert "done: loss" in logs and TOKEN not in logs
    files = hub.files(repo)
    assert "adapter/adapter_model.safetensors" in files and not any(p.startswith("checkpoints/") for p in files)
    assert (run / "adapter" / "adapter_model.safetensors").exists()  # the finished run came back here
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 60 and steps == sorted(steps)
    for path in [*home.rglob("*"), *(tmp_path / "runs").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_hf_jobs_offline_says_so(workspace, tmp_path):
    cfg = _config(workspace, tmp_path, model="Qwen/Qwen2.5-0.5B-Instruct")
    proc = run_cli("submit", "--config", str(cfg), "--name", "offline", "--backend", "hf-jobs",
                   "--flavor", "t4-small", home=tmp_path / "home", check=False)
    assert proc.returncode == 2 and "offline" in proc.stderr and "Traceback" not in proc.stderr
    listing = run_cli("jobs", home=tmp_path / "home").stdout
    assert "failed" in listing
