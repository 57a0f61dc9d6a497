"""The local job queue through the real CLI: one job at a time on CPU, cancel, timeout, worker crash, secrets."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import run_cli

pytestmark = pytest.mark.slow

TOKEN = "hf_PLANTEDsecretVALUE123456789"


def _config(ws: dict, folder: Path, steps: int, **extra) -> Path:
    path = folder / f"job-{steps}.yaml"
    path.write_text(yaml.safe_dump({"model": str(ws["model"]), "data": str(ws["data"]),
                                    "output_dir": str(folder / "runs"),
                                    "max_steps": steps, "batch_size": 8, "max_seq_len": 64, "lr": 3e-3,
                                    "save_every": 20, "lora_dropout": 0.1, **extra}))
    return path


def _submit(ws, home: Path, config: Path, name: str, *extra: str, env: dict | None = None) -> str:
    proc = run_cli("submit", "--config", str(config), "--name", name, "--no-worker", *extra, home=home, env=env)
    return proc.stdout.strip().splitlines()[-1]


def _worker(home: Path) -> subprocess.Popen:
    """A worker whose output goes to home/worker-N.log (read them when a test fails)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_HOME": str(home), "HF_TOKEN": TOKEN}
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / f"worker-{len(list(home.glob('worker-*.log')))}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "tunery.cli.app", "worker", "--exit-when-idle", "3"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _worker_logs(home: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(home.glob("worker-*.log")))


def _store(home: Path):
    os.environ["TUNERY_HOME"] = str(home)
    from tunery.jobs.store import JobStore

    return JobStore(home / "jobs.sqlite")


def _wait(pred, timeout: float = 180, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_jobs_run_one_at_a_time_and_succeed_with_secrets_kept_out(workspace, tmp_path, monkeypatch):
    home = tmp_path / "home"
    cfg = _config(workspace, tmp_path, 15)
    ids = [_submit(workspace, home, cfg, f"job{i}", "--secret", "HF_TOKEN", env={"HF_TOKEN": TOKEN})
           for i in range(3)]
    worker = _worker(home)
    store = _store(home)
    _wait(lambda: all(store.get(i).state in ("succeeded", "failed") for i in ids), what="three jobs")
    worker.wait(timeout=60)
    jobs = [store.get(i) for i in ids]
    assert [j.state for j in jobs] == ["succeeded"] * 3, [store.transitions(i) for i in ids]
    spans = sorted((j.started, j.finished) for j in jobs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "jobs overlapped on a 1-slot CPU worker"
    assert [m["step"] for m in store.metrics(ids[0])] == list(range(1, 16))
    assert [t["state"] for t in store.transitions(ids[0])] == ["queued", "running", "succeeded"]
    # the token reached no file: store, configs, manifests, logs, metrics
    for path in [*home.rglob("*"), *(tmp_path / "runs").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    listing = run_cli("jobs", home=home).stdout
    assert all(i in listing for i in ids) and "succeeded" in listing
    show = run_cli("jobs", "show", ids[0], home=home).stdout
    assert "HF_TOKEN" in show and TOKEN not in show
    assert any(ch in show for ch in "▁▂▃▄▅▆▇█") and "(15 steps)" in show  # the loss sparkline


def test_cancel_and_timeout(workspace, tmp_path):
    home = tmp_path / "home"
    long_cfg = _config(workspace, tmp_path, 100000)
    to_cancel = _submit(workspace, home, long_cfg, "cancel-me")
    to_time_out = _submit(workspace, home, long_cfg, "time-me-out", "--timeout", "5s")
    worker = _worker(home)
    store = _store(home)
    _wait(lambda: store.get(to_cancel).step > 0, what="the first job to train")
    asked = time.time()
    run_cli("cancel", to_cancel, home=home)
    _wait(lambda: store.get(to_cancel).state == "cancelled", timeout=30, what="cancel")
    assert time.time() - asked < 20
    _wait(lambda: store.get(to_time_out).state not in ("queued", "running"), timeout=120, what="timeout")
    job = store.get(to_time_out)
    assert job.state == "timed-out" and 5 <= job.finished - job.started < 30
    worker.wait(timeout=60)


def test_budget_refuses_an_expensive_estimate_unless_told(workspace, tmp_path):
    home = tmp_path / "home"
    cfg = _config(workspace, tmp_path, 100000)
    proc = run_cli("submit", "--config", str(cfg), "--flavor", "h100", "--no-worker", home=home, check=False)
    assert proc.returncode == 2 and "has no GPU" in proc.stderr  # a CPU run is not billed as an H100's
    proc = run_cli("submit", "--config", str(cfg), "--flavor", "cpu-upgrade", "--budget", "0.0001usd",
                   "--no-worker", home=home, check=False)
    assert proc.returncode == 3 and "exceeds the budget" in proc.stderr
    assert not (home / "jobs.sqlite").exists() or not _store(home).list()
    proc = run_cli("submit", "--config", str(cfg), "--flavor", "cpu-upgrade", "--budget", "0.0001usd",
                   "--no-worker", "--yes", home=home)
    assert _store(home).list()[0].state == "queued"


def test_two_slots_run_two_jobs_at_once_and_retry_requeues_a_cancelled_job(workspace, tmp_path):
    home = tmp_path / "home"
    cfg = _config(workspace, tmp_path, 40)
    ids = [_submit(workspace, home, cfg, f"pair{i}") for i in range(2)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_HOME": str(home)}
    worker = subprocess.Popen([sys.executable, "-m", "tunery.cli.app", "worker", "--slots", "2",
                               "--exit-when-idle", "3"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    store = _store(home)
    _wait(lambda: all(store.get(i).state == "succeeded" for i in ids), what="two jobs")
    worker.wait(timeout=60)
    a, b = (store.get(i) for i in ids)
    assert a.started < b.finished and b.started < a.finished, "two slots should overlap"

    queued = _submit(workspace, home, cfg, "retry-me")
    run_cli("cancel", queued, home=home)
    assert store.get(queued).state == "cancelled"
    proc = run_cli("jobs", "retry", ids[0], home=home, check=False)
    assert proc.returncode == 2 and "succeeded" in proc.stderr
    run_cli("jobs", "retry", queued, home=home)  # starts a background worker, which finishes it
    _wait(lambda: store.get(queued).state == "succeeded", what="the retried job")
    assert [t["state"] for t in store.transitions(queued)] == ["queued", "cancelled", "queued", "running",
                                                                "succeeded"]
