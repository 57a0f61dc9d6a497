"""The local worker: claims queued jobs and runs each as `tunery train` in a subprocess.

    tunery worker            # runs until Ctrl-C; `tunery submit` starts one when none is running

One worker per TUNERY_HOME (a lock file); one job per free GPU, one at a time on CPU. A job's process
leads its own process group (setsid), so timeouts and cancels stop the whole process tree; it starts from a
minimal environment plus the secrets the job named (jobs/secrets.py). The worker records each process's
start time beside its PID and signals a PID only while that start time still matches: a PID the OS has
since given to another process is never touched.

SIGTERM and SIGHUP (systemd, `timeout`, a closed terminal) stop a worker as Ctrl-C does: its trainings are
stopped and their jobs queued again, to resume from their last checkpoint. A worker that dies without
that (SIGKILL) leaves its jobs 'running' with a dead owner: `reconcile`, which the next worker and every
command that reads the store run, stops any leftover training it can prove is the job's, and queues the job
again (or marks it succeeded when the leftover training had finished).
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
from tunery.jobs.secrets import drop_secrets, job_environment, load_secrets
from tunery.jobs.store import Job, JobStore
from tunery.paths import tunery_home
from tunery.run import started

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


REMOTE_POLL_S = 30.0  # how often a worker refreshes running remote jobs


def train_command(run_dir: Path) -> list[str]:
    """Fresh start from the prepared config, or resume once training has begun in the folder (tunery.run)."""
    base = [sys.executable, "-m", "tunery.cli.app", "train"]
    return base + (["--resume", str(run_dir)] if started(run_dir) else ["--config", str(run_dir / "config.yaml")])


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


def process_start(pid: int | None) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), or None if there is no
    such process. With the PID, it names one process: a PID reused later has another start time."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3


def _ours(job: Job) -> bool:
    """Whether the job's recorded process is alive and provably the one the worker started."""
    return bool(job.pid and job.pid_start and process_start(job.pid) == job.pid_start)


def reconcile(store: JobStore, keep: set[str] = frozenset()) -> list[str]:
    """Settle local jobs left 'running' by a worker that is gone (workers in `keep` count as alive): a leftover
    training the job provably started is stopped, and the job is queued again to resume from its checkpoint, or
    marked succeeded when its training had finished (result.json written). Returns the ids it changed."""
    host, workers = socket.gethostname(), store.workers()
    live = set(keep) | {w["id"] for w in workers
                        if time.time() - w["heartbeat"] < HEARTBEAT_STALE_S and (w["host"] != host or _alive(w["pid"]))}
    last_beat = {w["id"]: w["heartbeat"] for w in workers}
    changed = []
    for job in store.list(limit=1000):
        if job.state != "running" or job.backend != "local" or job.worker in live:
            continue
        if _ours(job):
            _kill_tree(job.pid)
        used = (job.used_s or 0.0) + _ran_until_gone(job, last_beat.get(job.worker))
        if (Path(job.run_dir) / "result.json").exists():
            done = store.set_state(job.id, "succeeded", f"training finished after worker {job.worker} stopped",
                                   expect=("running",), pid=None, returncode=0, used_s=used)
            if done:
                drop_secrets(job.id)
        else:
            done = store.set_state(job.id, "queued", f"worker {job.worker} is gone; will resume from the last "
                                   "checkpoint", expect=("running",), pid=None, worker=None, used_s=used)
        if done:
            changed.append(job.id)
    return changed


def _ran_until_gone(job: Job, last_beat: float | None) -> float:
    """How long an attempt whose worker vanished ran: until that worker's last heartbeat, as far as is known."""
    if not job.attempt_started:
        return 0.0
    return max(0.0, (last_beat or time.time()) - job.attempt_started)


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
        self.remote_poll_s = REMOTE_POLL_S
        self._remote_polled, self._remote_busy = 0.0, False

    def recover(self) -> None:
        """Requeue 'running' local jobs whose worker is gone, stopping their leftover processes first."""
        reconcile(self.store, keep={self.id})

    def run(self, exit_when_idle: float | None = None) -> None:
        lock = WorkerLock(self.store.path.parent)
        if not lock.acquire():
            raise TuneryError(f"a worker is already running for {self.store.path.parent} (lock {lock.path})")
        idle_since = time.time()
        previous = _stop_on_signals()
        try:
            self.recover()
            while True:
                self.store.heartbeat(self.id, os.getpid(), self.host)
                self._fill_slots()
                busy = bool(self.running) | self._watch_remote()
                self._check_running()
                if busy:
                    idle_since = time.time()
                elif exit_when_idle is not None and time.time() - idle_since > exit_when_idle:
                    return
                time.sleep(self.poll_s)
        except _Stopped as e:
            print(f"worker {self.id}: {e}; stopping its jobs, which will resume", file=sys.stderr, flush=True)
        finally:
            _restore_signals(previous)
            for r in list(self.running.values()):
                _kill_tree(r.proc.pid, proc=r.proc)
                self._stream_metrics(r)
                job = self.store.get(r.job.id)
                self.store.set_state(r.job.id, "queued", "worker stopped; will resume from the last checkpoint",
                                     expect=("running",), pid=None, worker=None, used_s=job.elapsed)
                r.log.close()
            self.running.clear()
            self.store.remove_worker(self.id)
            lock.release()

    def _watch_remote(self) -> bool:
        """Every `remote_poll_s`, bring running remote jobs up to date: their metrics, their state, and a stop
        through the backend's API once past their timeout or budget (so nobody has to be looking for a budget
        to hold). True while one is running; a backend that cannot be reached keeps no worker waiting."""
        if time.time() - self._remote_polled < self.remote_poll_s:
            return self._remote_busy
        from tunery.jobs.backends import get_backend

        self._remote_polled, busy = time.time(), False
        for job in self.store.list(limit=1000):
            if job.backend == "local" or job.state != "running":
                continue
            try:
                busy |= get_backend(job.backend).refresh(job).state == "running"
            except Exception as e:  # noqa: BLE001 - a network or Ray error must not end the worker
                print(f"worker {self.id}: could not refresh {job.id} from {job.backend} ({type(e).__name__}: "
                      f"{e})", file=sys.stderr, flush=True)
        self._remote_busy = busy
        return busy

    def _fill_slots(self) -> None:
        free = sorted(set(range(self.slots)) - {r.slot for r in self.running.values()})
        for slot in free:
            job = self.store.claim(self.id)
            if job is None:
                return
            self._start(job, slot)

    def _start(self, job: Job, slot: int) -> None:
        run_dir = Path(job.run_dir)
        try:
            secrets = load_secrets(job.id, job.secret_names)
        except TuneryError as e:
            self.store.set_state(job.id, "failed", str(e), expect=("running",))
            return
        # a minimal environment and the job's own secrets: not the worker's (whoever started it) whole one
        env = {**job_environment(), **secrets, "TUNERY_JOB_ID": job.id, "PYTHONUNBUFFERED": "1"}
        if self.slots > 1 or os.environ.get("CUDA_VISIBLE_DEVICES") is None and gpu_slots() > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        log = open(run_dir / "job.log", "a", encoding="utf-8")
        log.write(f"--- attempt {job.attempts} by {self.id} at {time.ctime()} ---\n")
        log.flush()
        proc = subprocess.Popen(train_command(run_dir), stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=run_dir, start_new_session=True)
        self.store.update(job.id, pid=proc.pid, pid_start=process_start(proc.pid))
        self.running[job.id] = _Running(job, proc, slot, log)

    def _check_running(self) -> None:
        for job_id, r in list(self.running.items()):
            self._stream_metrics(r)
            job = self.store.get(job_id)
            code = r.proc.poll()
            if code is None:
                if job.cancel_requested:
                    r.final_state, r.reason = "cancelled", "cancelled by user"
                elif job.overrun():
                    r.final_state, r.reason = job.overrun()
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
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            state, reason = "failed", f"tunery train {how}; see {r.job.run_dir}/job.log (`tunery jobs show`)"
        job = self.store.get(r.job.id)
        if self.store.set_state(r.job.id, state, reason, expect=("running",), returncode=code, pid=None,
                                used_s=job.elapsed):
            drop_secrets(r.job.id)

    def _stream_metrics(self, r: _Running) -> None:
        r.metrics_cursor = self.store.ingest_metrics(r.job, r.metrics_cursor)


class _Stopped(Exception):
    """SIGTERM or SIGHUP reached the worker."""


def _stop_on_signals() -> dict:
    """SIGTERM and SIGHUP stop the worker as Ctrl-C does (its jobs are queued again); returns the old handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, _frame):
        raise _Stopped(f"received {signal.Signals(signum).name}")

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
