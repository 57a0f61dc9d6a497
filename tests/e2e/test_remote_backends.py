"""Remote backends offline: a real local Ray head on 127.0.0.1, and the Hugging Face Jobs script run here."""

from __future__ import annotations

import os
import shutil
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


def test_ray_backend_runs_the_job_and_returns_logs_and_state(workspace, tmp_path, ray_head, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    proc = run_cli("submit", "--config", str(_config(workspace, tmp_path)), "--name", "on-ray", "--backend", "ray",
                   "--address", ray_head, "--secret", "HF_TOKEN", home=home)
    job_id = proc.stdout.strip().splitlines()[-1]
    deadline = time.time() + 240
    while time.time() < deadline:
        show = run_cli("jobs", "show", job_id, home=home).stdout
        if "succeeded" in show or "failed" in show:
            break
        time.sleep(2)
    assert "Ray reports SUCCEEDED" in show, show
    assert "loss" in show  # metrics streamed into the store from the shared run folder
    logs = run_cli("logs", job_id, home=home).stdout
    assert "done: loss" in logs and TOKEN not in logs
    assert (tmp_path / "runs" / "on-ray" / "adapter" / "adapter_model.safetensors").exists()
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


def test_hf_jobs_request_carries_flavor_timeout_and_secrets_but_writes_no_secret(workspace, tmp_path,
                                                                                  monkeypatch):
    import huggingface_hub

    from tunery.jobs.backends import HFJobsBackend
    from tunery.jobs.flavors import estimate, get_flavor
    from tunery.jobs.store import JobStore
    from tunery.jobs.submit import prepare, queue

    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    sent = {}

    class Info:
        id = "remote-123"

    def fake_run_uv_job(script, **kwargs):
        sent.update(kwargs, script=script)
        return Info()

    monkeypatch.setattr(huggingface_hub, "run_uv_job", fake_run_uv_job)
    from tunery.config import RunConfig

    cfg = RunConfig.from_yaml(_config(workspace, tmp_path)).replace(model="Qwen/Qwen2.5-0.5B-Instruct", name="hf")
    cfg, run_dir, est = prepare(cfg, "a10g-small", "hf-jobs")
    store = JobStore()
    job = queue(cfg, run_dir, est, flavor="a10g-small", backend="hf-jobs", timeout_s=3600, budget_usd=5.0,
                secrets=["HF_TOKEN"], store=store)
    HFJobsBackend(store, output_repo="me/hf-run").submit(job)
    assert sent["flavor"] == "a10g-small" and sent["timeout"] == 3600 and sent["name"] == "hf"
    assert sent["secrets"] == {"HF_TOKEN": TOKEN} and sent["env"] == {"TUNERY_OUTPUT_REPO": "me/hf-run"}
    assert Path(sent["script"]).read_text().startswith("# /// script")
    job = store.get(job.id)
    assert job.state == "running" and job.external_id == "remote-123"
    for path in [*(tmp_path / "home").rglob("*"), *run_dir.rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert estimate(1000, 0.5, get_flavor("a10g-small")).usd > 0


def test_hf_jobs_offline_says_so(workspace, tmp_path):
    cfg = _config(workspace, tmp_path, model="Qwen/Qwen2.5-0.5B-Instruct")
    proc = run_cli("submit", "--config", str(cfg), "--name", "offline", "--backend", "hf-jobs",
                   "--flavor", "t4-small", home=tmp_path / "home", check=False)
    assert proc.returncode == 2 and "offline" in proc.stderr and "Traceback" not in proc.stderr
    listing = run_cli("jobs", home=tmp_path / "home").stdout
    assert "failed" in listing
