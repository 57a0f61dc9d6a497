"""The local worker: claims queued jobs and runs each as `tunery train` in a subprocess.

    tunery worker            # runs until Ctrl-C; `tunery submit` starts one when none is running

One worker per TUNERY_HOME (a lock file); one job per free GPU, one at a time on CPU. A job's process
leads its own process group (setsid), so timeouts and cancels stop the whole process tree. A worker that dies
(even by SIGKILL) leaves its jobs 'running' with a dead owner: the next worker stops any leftover
training process, puts the job back in the queue, and resumes it from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tunery.errors import TuneryError
from tunery.jobs.store import Job, JobStore
from tunery.paths import tunery_home

HEARTBEAT_STALE_S = 30


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    slot: int
    log: object
    metrics_cursor: tuple[int, int] = (0, 0)
    reason: str | None = None
    final_state: str | None = None
    extra: dict = field(default_factory=dict)


def train_command(run_dir: Path) -> list[str]:
    """Fresh start from the prepared config, or resume once the run has written anything else."""
    base = [sys.executable, "-m", "tunery.cli.app", "train"]
    started = [p.name for p in run_dir.iterdir() if p.name not in ("config.yaml", "job.log")]
    return base + (["--resume", str(run_dir)] if started else ["--config", str(run_dir / "config.yaml")])


def gpu_slots() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_tree(pid: int, grace: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group of `pid`, then SIGKILL what is left after `grace` seconds.

    For our own child `proc`, its exit is read with poll(): an unreaped child would look alive forever.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return

    def gone() -> bool:
        if proc is not None:
            return proc.poll() is not None
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if gone():
                return
            time.sleep(0.05)


def _is_training_process(pid: int | None) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _alive(pid)
    return b"tunery" in cmdline


class WorkerLock:
    """An exclusive flock on TUNERY_HOME/worker.lock; released by the OS when the process dies."""

    def __init__(self, home: Path | None = None):
        self.path = (home or tunery_home()) / "worker.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def acquire(self) -> bool:
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            self._fh = None
            return False
        return True

    def release(self) -> None:
        if self._fh:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def worker_running(home: Path | None = None) -> bool:
    lock = WorkerLock(home)
    if lock.acquire():
        lock.release()
        return False
    return True


class LocalWorker:
    def __init__(self, store: JobStore | None = None, slots: int | None = None, poll_s: float = 0.5):
        self.store = store or JobStore()
        self.slots = slots or gpu_slots()
        self.poll_s = poll_s
        self.host = socket.gethostname()
        self.id = f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.running: dict[str, _Running] = {}

    def recover(self) -> None:
        """Requeue 'running' local jobs whose worker is gone, stopping their leftover processes first."""
        live = {w["id"] for w in self.store.workers()
                if w["id"] == self.id or (time.time() - w["heartbeat"] < HEARTBEAT_STALE_S
                                          and (w["host"] != self.host or _alive(w["pid"])))}
        for job in self.store.list(limit=1000):
            if job.state != "running" or job.backend != "local" or job.worker in live:
                continue
            if job.pid and _is_training_process(job.pid):
                _kill_tree(job.pid)
            self.store.set_state(job.id, "queued", f"worker {job.worker} died; resuming from last checkpoint",
                                 expect=("running",), pid=None, worker=None)

    def run(self, exit_when_idle: float | None = None) -> None:
        lock = WorkerLock(self.store.path.parent)
        if not lock.acquire():
            raise TuneryError(f"a worker is already running for {self.store.path.parent} (lock {lock.path})")
        idle_since = time.time()
        try:
            self.recover()
            while True:
                self.store.heartbeat(self.id, os.getpid(), self.host)
                self._fill_slots()
                busy = bool(self.running)
                self._check_running()
                if busy:
                    idle_since = time.time()
                elif exit_when_idle is not None and time.time() - idle_since > exit_when_idle:
                    return
                time.sleep(self.poll_s)
        finally:
            for r in list(self.running.values()):
                _kill_tree(r.proc.pid, proc=r.proc)
                self.store.set_state(r.job.id, "queued", "worker stopped; will resume", expect=("running",),
                                     pid=None, worker=None)
            self.store.remove_worker(self.id)
            lock.release()

    def _fill_slots(self) -> None:
        free = sorted(set(range(self.slots)) - {r.slot for r in self.running.values()})
        for slot in free:
            job = self.store.claim(self.id)
            if job is None:
                return
            self._start(job, slot)

    def _start(self, job: Job, slot: int) -> None:
        run_dir = Path(job.run_dir)
        missing = [name for name in job.secret_names if name not in os.environ]
        if missing:
            self.store.set_state(job.id, "failed", f"secret(s) {', '.join(missing)} not set in the worker's "
                                 "environment; export them and restart `tunery worker`", expect=("running",))
            return
        env = {**os.environ, "TUNERY_JOB_ID": job.id, "PYTHONUNBUFFERED": "1"}
        if self.slots > 1 or os.environ.get("CUDA_VISIBLE_DEVICES") is None and gpu_slots() > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        log = open(run_dir / "job.log", "a", encoding="utf-8")
        log.write(f"--- attempt {job.attempts} by {self.id} at {time.ctime()} ---\n")
        log.flush()
        proc = subprocess.Popen(train_command(run_dir), stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=run_dir, start_new_session=True)
        self.store.update(job.id, pid=proc.pid)
        self.running[job.id] = _Running(job, proc, slot, log)

    def _check_running(self) -> None:
        for job_id, r in list(self.running.items()):
            self._stream_metrics(r)
            job = self.store.get(job_id)
            code = r.proc.poll()
            if code is None:
                if job.cancel_requested:
                    r.final_state, r.reason = "cancelled", "cancelled by user"
                elif job.timeout_s and time.time() - job.started > job.timeout_s:
                    r.final_state, r.reason = "timed-out", f"ran past its {job.timeout_s}s timeout"
                elif job.budget_usd is not None and job.cost_so_far > job.budget_usd:
                    r.final_state, r.reason = "cancelled", f"budget ${job.budget_usd:.2f} used up"
                else:
                    continue
                _kill_tree(r.proc.pid, grace=5.0, proc=r.proc)
                r.proc.wait()
                code = r.proc.returncode
            self._finish(r, code)
            del self.running[job_id]

    def _finish(self, r: _Running, code: int) -> None:
        self._stream_metrics(r)
        r.log.close()
        if r.final_state:
            state, reason = r.final_state, r.reason
        elif code == 0:
            state, reason = "succeeded", "training finished"
        else:
            state, reason = "failed", f"tunery train exited with status {code}; see {r.job.run_dir}/job.log"
        self.store.set_state(r.job.id, state, reason, expect=("running",), returncode=code, pid=None)

    def _stream_metrics(self, r: _Running) -> None:
        r.metrics_cursor = self.store.ingest_metrics(r.job, r.metrics_cursor)
