"""The local queue under the failures a reliability engineer tries: parallel submits, signals to the worker,
secrets given as values, foreign processes behind stale PIDs, retries after a timeout, cancel racing a claim,
a damaged store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from .conftest import metrics, run_cli
from .test_jobs import _config, _store, _submit, _wait, _worker, _worker_logs

pytestmark = pytest.mark.slow

TOKEN = "hf_PLANTEDrotatedVALUE987654321"

_SUBMITTER = """
import sys
from pathlib import Path
from tunery.config import RunConfig
from tunery.jobs import submit
config, prefix, named = sys.argv[1], sys.argv[2], sys.argv[3] == "named"
for k in range(5):
    cfg = RunConfig.from_yaml(config)
    if named:
        cfg = cfg.replace(name=f"{prefix}-{k}", lr=1e-3 * (k + 1))
    cfg, run_dir, est = submit.prepare(cfg, "local", "local", base=Path(config).parent)
    job = submit.queue(cfg, run_dir, est, flavor="local", backend="local", timeout_s=None, budget_usd=None,
                       secrets=[])
    print(job.id, job.run_dir, flush=True)
"""


@pytest.mark.parametrize("named", [False, True])
def test_twenty_parallel_submits_give_twenty_jobs_in_twenty_folders(workspace, tmp_path, named):
    home = tmp_path / "home"
    cfg = _config(workspace, tmp_path, 10)
    env = {**os.environ, "TUNERY_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _SUBMITTER, str(cfg), f"p{i}", "named" if named else "auto"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    lines = [line.split() for out, _ in outs for line in out.splitlines()]
    jobs = _store(home).list(limit=100)
    why = (lines, [(j.name, j.run_dir) for j in jobs], [err[-800:] for _, err in outs])  # what to look at if not
    assert len(lines) == len(jobs) == 20 and len({j.run_dir for j in jobs}) == 20, why
    for job in jobs:  # each folder holds its own job's config
        written = yaml.safe_load((Path(job.run_dir) / "config.yaml").read_text())
        assert written["name"] == job.name == Path(job.run_dir).name
        if named:
            k = int(job.name.rsplit("-", 1)[1])
            assert written["lr"] == pytest.approx(1e-3 * (k + 1))


def test_the_same_name_from_two_processes_gives_one_job(workspace, tmp_path):
    home = tmp_path / "home"
    cfg = _config(workspace, tmp_path, 10)
    results = []

    def submit_one():
        results.append(run_cli("submit", "--config", str(cfg), "--name", "twin", "--no-worker", home=home,
                               check=False))

    threads = [threading.Thread(target=submit_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.returncode for r in results) == [0, 2, 2], [r.stderr for r in results]
    assert all("already exists" in r.stderr for r in results if r.returncode)
    assert len(_store(home).list()) == 1


def test_a_secret_given_as_its_value_is_refused_and_never_shown(workspace, tmp_path):
    home = tmp_path / "home"
    cfg = _config(workspace, tmp_path, 10)
    for given in (TOKEN, f"HF_TOKEN={TOKEN}"):
        proc = run_cli("submit", "--config", str(cfg), "--name", "leaky", "--no-worker", "--secret", given,
                       home=home, check=False)
        assert proc.returncode == 2 and ("NAME of an environment variable" in proc.stderr
                                         or "not shown: it may be a value" in proc.stderr), proc.stderr
        assert TOKEN not in proc.stdout + proc.stderr
    proc = run_cli("submit", "--config", str(cfg), "--name", "leaky", "--no-worker", "--secret", "NOT_SET_HERE",
                   home=home, check=False)
    assert proc.returncode == 2 and "NOT_SET_HERE not set" in proc.stderr
    assert not (tmp_path / "runs" / "leaky").exists()  # a refused submit leaves no folder to block the name
    for path in [*home.rglob("*"), *tmp_path.rglob("*.yaml")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_a_job_sees_only_the_secrets_it_named_as_the_submitter_had_them(workspace, tmp_path):
    """The worker holds an old token and a variable nobody named; the jobs were submitted with a new token."""
    home = tmp_path / "home"
    cfg = _config(workspace, tmp_path, 100000)
    new = {"HF_TOKEN": TOKEN, "OTHER_SECRET": "not-for-jobs"}
    plain = _submit(workspace, home, cfg, "plain", env=new)
    named = _submit(workspace, home, cfg, "named", "--secret", "HF_TOKEN", env=new)
    secrets_dir = home / "secrets"
    assert oct(secrets_dir.stat().st_mode & 0o777) == "0o700"
    assert [oct(p.stat().st_mode & 0o777) for p in secrets_dir.iterdir()] == ["0o600"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNERY_HOME": str(home), "HF_TOKEN": "hf_OLDstale",
           "OTHER_SECRET": "worker-only"}
    worker = subprocess.Popen([sys.executable, "-m", "tunery.cli.app", "worker", "--exit-when-idle", "3"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = _store(home)
    seen = {}
    for job_id in (plain, named):
        _wait(lambda j=job_id: store.get(j).state == "running" and store.get(j).pid, what="the job to start")
        seen[job_id] = _environ(store.get(job_id).pid)
        run_cli("cancel", job_id, home=home)
        _wait(lambda j=job_id: store.get(j).state == "cancelled", timeout=60, what="cancel")
    worker.wait(timeout=60)
    assert "HF_TOKEN" not in seen[plain] and "OTHER_SECRET" not in seen[plain]
    assert seen[named]["HF_TOKEN"] == TOKEN and "OTHER_SECRET" not in seen[named]
    assert seen[plain]["TUNERY_JOB_ID"] == plain and "PATH" in seen[plain]
    assert not list(secrets_dir.iterdir())  # deleted when the jobs ended


def _foreign_process() -> subprocess.Popen:
    """An unrelated process whose command line even says 'tunery'."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "tunery", "train"],
                            start_new_session=True)


def test_a_stale_pid_of_a_foreign_process_is_never_signalled(tmp_path, monkeypatch):
    from tunery.jobs.worker import process_start, reconcile

    monkeypatch.setenv("TUNERY_HOME", str(tmp_path))
    store = _store(tmp_path)
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    foreign, ours = _foreign_process(), _foreign_process()
    try:
        jobs = []
        for proc, start in ((foreign, "1"), (ours, process_start(ours.pid))):  # "1": the PID was reused since
            job = store.add(name="x", model="m", backend="local", flavor="local", run_dir=str(run), timeout_s=None,
                            budget_usd=None, usd_per_hour=0.0, estimate=None, secret_names=[])
            store.claim("gone-worker")
            store.update(job.id, pid=proc.pid, pid_start=start)
            jobs.append(job.id)
        assert sorted(reconcile(store)) == sorted(jobs)
        assert foreign.poll() is None, "a process the job never started was signalled"
        ours.wait(timeout=30)  # the job's own leftover process is stopped
        assert [store.get(j).state for j in jobs] == ["queued", "queued"]
    finally:
        for p in (foreign, ours):
            p.kill()


@pytest.fixture(scope="module")
def straight(workspace, tmp_path_factory) -> dict:
    """A 60-step run that nobody stopped: the loss a resumed job must reach."""
    root = tmp_path_factory.mktemp("straight")
    cfg = _config(workspace, root, 60)
    run_cli("train", "--config", str(cfg), "--name", "straight", home=root / "home")
    return json.loads((root / "runs" / "straight" / "result.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_a_worker_stopped_mid_job_resumes_it_on_the_same_loss(workspace, tmp_path, sig, straight):
    """SIGTERM and SIGHUP stop the worker as Ctrl-C does (the job is queued again at once); after SIGKILL the job
    stays 'running' with nobody left to say otherwise, until the next worker reconciles it. Either way the
    next worker resumes it from its checkpoint to the loss of a run that was never stopped."""
    home = tmp_path / "home"
    cfg = _config(workspace, tmp_path, 60)
    job_id = _submit(workspace, home, cfg, "signalled")
    worker = _worker(home)
    store = _store(home)
    run = tmp_path / "runs" / "signalled"
    _wait(lambda: (run / "checkpoints" / "step-0000020").exists(), what="a first checkpoint")
    worker.send_signal(sig)
    worker.wait(timeout=60)
    job = store.get(job_id)
    if sig == signal.SIGKILL:
        assert job.state == "running"
    else:
        assert job.state == "queued" and job.pid is None, (store.transitions(job_id), _worker_logs(home))
    assert not (run / "result.json").exists()
    _worker(home).wait(timeout=300)
    job = store.get(job_id)
    reasons = " | ".join(t["reason"] for t in store.transitions(job_id))
    if sig == signal.SIGKILL and job.attempts == 1:
        # on a slow machine the orphaned training can finish before the next worker is up: it then reconciles
        # the job as done (the run is complete: the checks below hold) instead of resuming it
        assert job.state == "succeeded" and "finished after worker" in reasons, reasons
    else:
        assert job.state == "succeeded" and job.attempts == 2, (store.transitions(job_id), _worker_logs(home))
        assert ("is gone" if sig == signal.SIGKILL else "worker stopped") in reasons, reasons
    final = json.loads((run / "result.json").read_text())
    assert final["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-4)
    assert [m["step"] for m in metrics(run)] == list(range(1, 61))


def test_a_timed_out_job_retried_gets_a_fresh_allowance(workspace, tmp_path):
    home = tmp_path / "home"
    cfg = _config(workspace, tmp_path, 30)
    job_id = _submit(workspace, home, cfg, "slow", "--timeout", "1s")
    _worker(home).wait(timeout=120)
    store = _store(home)
    assert store.get(job_id).state == "timed-out"
    time.sleep(2)  # a gap between attempts: not running time
    run_cli("jobs", "retry", job_id, "--timeout", "10m", home=home)
    _wait(lambda: store.get(job_id).state not in ("queued", "running"), timeout=300, what="the retried job")
    job = store.get(job_id)
    assert job.state == "succeeded", store.transitions(job_id)
    assert job.timeout_s == 600 and job.elapsed < 300  # this attempt's time, not the first's or the gap


def test_a_plain_retry_starts_the_clock_again(tmp_path):
    store = _store(tmp_path)
    job = store.add(name="x", model="m", backend="local", flavor="local", run_dir=str(tmp_path), timeout_s=60,
                    budget_usd=None, usd_per_hour=0.0, estimate=None, secret_names=[])
    store.claim("w")
    store.set_state(job.id, "timed-out", "ran past its timeout", expect=("running",), used_s=61.0)
    assert store.get(job.id).elapsed == pytest.approx(61.0)
    run_cli("jobs", "retry", job.id, home=tmp_path, env={"TUNERY_HOME": str(tmp_path)})
    assert store.get(job.id).elapsed == 0.0 and store.get(job.id).state in ("queued", "running", "failed")


def test_cancel_racing_a_claim_always_cancels(tmp_path):
    store = _store(tmp_path)
    for _ in range(30):
        job = store.add(name="r", model="m", backend="local", flavor="local", run_dir=str(tmp_path), timeout_s=None,
                        budget_usd=None, usd_per_hour=0.0, estimate=None, secret_names=[])
        outcome = {}
        claim = threading.Thread(target=lambda: store.claim("w"))
        cancel = threading.Thread(target=lambda j=job.id, o=outcome: o.setdefault("c", store.cancel(j)))
        claim.start()
        cancel.start()
        claim.join()
        cancel.join()
        after = store.get(job.id)
        assert outcome["c"] in ("cancelled", "requested")
        assert after.state == "cancelled" or (after.state == "running" and after.cancel_requested)


@pytest.mark.parametrize("content", [b"", b"not a database at all" * 100])
def test_a_damaged_store_gives_a_clear_error(tmp_path, content):
    home = tmp_path / "home"
    home.mkdir()
    (home / "jobs.sqlite").write_bytes(content)
    proc = run_cli("jobs", home=home, check=False)
    assert proc.returncode == 2 and "cannot be read" in proc.stderr and "Traceback" not in proc.stderr
    assert (home / "jobs.sqlite").read_bytes() == content  # never silently replaced


def test_an_unusable_home_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("jobs", home=blocker / "home", check=False)
    assert proc.returncode == 2 and "TUNERY_HOME" in proc.stderr and "Traceback" not in proc.stderr


def test_a_worker_gone_while_its_training_finished_is_reconciled(workspace, tmp_path):
    """A job whose worker vanished but whose training completed is succeeded, not re-run; `logs -f` returns."""
    from tunery.jobs.worker import reconcile

    home = tmp_path / "home"
    store = _store(home)
    cfg = _config(workspace, tmp_path, 5)
    job_id = _submit(workspace, home, cfg, "orphan")
    store.claim("vanished-worker")
    run_cli("train", "--config", str(tmp_path / "runs" / "orphan" / "config.yaml"), home=home)  # the orphan
    assert store.get(job_id).state == "running"
    proc = run_cli("logs", job_id, "-f", home=home, timeout=60)  # reconciles, so it ends
    assert store.get(job_id).state == "succeeded" and proc.returncode == 0
    assert reconcile(store) == []
