"""The job store: SQLite in WAL mode under TUNERY_HOME, safe for a CLI and a worker at once.

Every state change is a row in `transitions` (time + reason); claiming a job is one atomic UPDATE, so
two workers never run the same job.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunery.errors import TuneryError
from tunery.paths import tunery_home

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "timed-out")
FINAL = ("succeeded", "failed", "cancelled", "timed-out")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, name TEXT, model TEXT, backend TEXT, flavor TEXT, state TEXT NOT NULL,
  run_dir TEXT NOT NULL, timeout_s INTEGER, budget_usd REAL, usd_per_hour REAL, estimate TEXT,
  secret_names TEXT, created REAL, started REAL, finished REAL, worker TEXT, pid INTEGER,
  cancel_requested INTEGER DEFAULT 0, progress REAL DEFAULT 0, total_steps INTEGER, step INTEGER DEFAULT 0,
  last_loss REAL, external_id TEXT, attempts INTEGER DEFAULT 0, returncode INTEGER);
CREATE TABLE IF NOT EXISTS transitions (job_id TEXT, state TEXT, at REAL, reason TEXT);
CREATE TABLE IF NOT EXISTS metrics (job_id TEXT, step INTEGER, loss REAL, lr REAL, eval_loss REAL, at REAL,
  PRIMARY KEY (job_id, step));
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, pid INTEGER, host TEXT, heartbeat REAL);
"""
# columns added after the first release: (name, SQL type and default); added to older stores when opened
_ADDED = (("pid_start", "TEXT"),  # the job process's start time (/proc/<pid>/stat): proves a PID is still ours
          ("attempt_started", "REAL"),  # when the current attempt began running
          ("used_s", "REAL DEFAULT 0"),  # running time of earlier attempts within the current allowance
          ("output_repo", "TEXT"))  # hf-jobs: the Hub repo that holds the job's script, checkpoints and run


@dataclass
class Job:
    id: str
    name: str
    model: str
    backend: str
    flavor: str
    state: str
    run_dir: str
    timeout_s: int | None
    budget_usd: float | None
    usd_per_hour: float
    estimate: str | None
    secret_names: list[str]
    created: float
    started: float | None
    finished: float | None
    worker: str | None
    pid: int | None
    cancel_requested: bool
    progress: float
    total_steps: int | None
    step: int
    last_loss: float | None
    external_id: str | None
    attempts: int
    returncode: int | None
    pid_start: str | None = None
    attempt_started: float | None = None
    used_s: float = 0.0
    output_repo: str | None = None

    @property
    def elapsed(self) -> float:
        """Running time within the current allowance: earlier attempts (not the gaps between them) plus the one
        running now. What a timeout and a budget are held to; `tunery retry` starts a fresh allowance."""
        running = time.time() - self.attempt_started if self.state == "running" and self.attempt_started else 0.0
        return (self.used_s or 0.0) + max(running, 0.0)

    @property
    def cost_so_far(self) -> float:
        return self.elapsed / 3600 * self.usd_per_hour

    def overrun(self) -> tuple[str, str] | None:
        """(final state, why) once the allowance is used up (past its timeout or its budget), else None. The
        local worker and the remote backends stop a job by this same rule."""
        from tunery.jobs.flavors import money

        if self.timeout_s and self.elapsed > self.timeout_s:
            return "timed-out", f"ran past its {self.timeout_s}s timeout"
        if self.budget_usd is not None and self.cost_so_far > self.budget_usd:
            return "cancelled", f"budget {money(self.budget_usd)} used up"
        return None


class JobStore:
    def __init__(self, path: Path | None = None):
        self.path = path or tunery_home() / "jobs.sqlite"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one process at a time creates or upgrades the store: another one opening it meanwhile would see a
            # file with no header yet, which is also what a store emptied by accident looks like
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self.path.exists() and self.path.stat().st_size == 0:  # SQLite would read it as a new store
                    raise sqlite3.DatabaseError("the file is empty")
                with self._db() as db:
                    _check_integrity(db)
                    db.executescript(_SCHEMA)
                    have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
                    for name, kind in _ADDED:
                        if name not in have:
                            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        except sqlite3.DatabaseError as e:
            raise TuneryError(f"the job store {self.path} cannot be read ({e}): it is damaged or not a tunery "
                              "store. Move it aside (its run folders are untouched) and run the command again; "
                              "a new, empty store is made") from None
        except OSError as e:  # not a folder, not writable, a full disk
            raise TuneryError(f"cannot write the job store under {self.path.parent} ({e.strerror or e}); set "
                              "TUNERY_HOME to a folder you can write") from None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.OperationalError as e:  # a folder it cannot create or open the file in
            raise TuneryError(f"cannot open the job store {self.path} ({e}); set TUNERY_HOME to a folder you can "
                              "write") from None
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        try:
            yield db
        finally:
            db.close()

    def add(self, *, name: str, model: str, backend: str, flavor: str, run_dir: str, timeout_s: int | None,
            budget_usd: float | None, usd_per_hour: float, estimate: str | None, secret_names: list[str]) -> Job:
        job_id = time.strftime("%m%d") + "-" + uuid.uuid4().hex[:6]
        now = time.time()
        with self._db() as db:
            db.execute("INSERT INTO jobs (id, name, model, backend, flavor, state, run_dir, timeout_s, budget_usd,"
                       " usd_per_hour, estimate, secret_names, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (job_id, name, model, backend, flavor, "queued", run_dir, timeout_s, budget_usd,
                        usd_per_hour, estimate, json.dumps(secret_names), now))
            db.execute("INSERT INTO transitions VALUES (?,?,?,?)", (job_id, "queued", now, "submitted"))
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE id = ? OR id LIKE ?", (job_id, job_id + "%")).fetchall()
        if len(rows) != 1:
            raise TuneryError(f"no job {job_id!r}" if not rows else f"job id {job_id!r} is ambiguous; give more of it")
        return _job(rows[0])

    def list(self, limit: int = 50) -> list[Job]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def transitions(self, job_id: str) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT state, at, reason FROM transitions WHERE job_id = ? ORDER BY rowid",
                              (job_id,)).fetchall()
        return [dict(r) for r in rows]

    def set_state(self, job_id: str, state: str, reason: str, expect: tuple[str, ...] | None = None,
                  **fields) -> bool:
        """Move a job to `state` (only from `expect` states when given); records the transition."""
        assert state in STATES, state
        now = time.time()
        if state == "running":
            fields.setdefault("started", now)
        if state in FINAL:
            fields.setdefault("finished", now)
        sets = ", ".join(["state = ?"] + [f"{k} = ?" for k in fields])
        where = "id = ?" + (f" AND state IN ({','.join('?' * len(expect))})" if expect else "")
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            changed = db.execute(f"UPDATE jobs SET {sets} WHERE {where}",
                                 (state, *fields.values(), job_id, *(expect or ()))).rowcount
            if changed:
                db.execute("INSERT INTO transitions VALUES (?,?,?,?)", (job_id, state, now, reason))
            db.execute("COMMIT")
        return bool(changed)

    def claim(self, worker: str, backend: str = "local") -> Job | None:
        """Atomically move the oldest queued job of `backend` to running for `worker`."""
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' AND backend = ? ORDER BY created LIMIT 1",
                             (backend,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET state = 'running', worker = ?, started = COALESCE(started, ?), "
                       "attempt_started = ?, attempts = attempts + 1 WHERE id = ?", (worker, now, now, row["id"]))
            db.execute("INSERT INTO transitions VALUES (?,?,?,?)", (row["id"], "running", now, f"claimed by {worker}"))
            db.execute("COMMIT")
        return self.get(row["id"])

    def cancel(self, job_id: str) -> str:
        """Cancel in one transaction, whatever the job's state is by then: a queued job is cancelled at once
        ("cancelled"), a running one is asked to stop ("requested": its worker or backend stops it), a finished
        one is left as it is (its state). A worker claiming the job meanwhile cannot slip between the two."""
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            state = row["state"] if row else "missing"
            if state == "queued":
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (now, job_id))
                db.execute("INSERT INTO transitions VALUES (?,?,?,?)",
                           (job_id, "cancelled", now, "cancelled by user before it started"))
                state = "cancelled"
            elif state == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                state = "requested"
            db.execute("COMMIT")
        return state

    def update(self, job_id: str, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def add_metrics(self, job_id: str, records: list[dict]) -> None:
        with self._db() as db:
            db.executemany("INSERT OR REPLACE INTO metrics VALUES (?,?,?,?,?,?)",
                           [(job_id, r["step"], r.get("loss"), r.get("lr"), r.get("eval_loss"), time.time())
                            for r in records])

    def ingest_metrics(self, job: Job, cursor: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """Copy new complete lines of the run's metrics.jsonl into the store.

        `cursor` is (inode, byte offset) of what was read before; a resume rewrites the file under a new
        inode (tunery.train.metrics), which sends the reader back to its start.
        """
        path = Path(job.run_dir) / "metrics.jsonl"
        try:
            with open(path, "rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                offset = cursor[1] if cursor[0] == inode else 0
                fh.seek(offset)
                lines = fh.read().split(b"\n")
        except FileNotFoundError:
            return cursor
        complete = lines[:-1]  # the last piece is empty or a line still being written
        offset += sum(len(line) + 1 for line in complete)
        records = []
        for line in complete:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # never let one odd line stop the worker; the file itself stays as written
        records = [r for r in records if isinstance(r, dict) and "step" in r]
        if records:
            self.add_metrics(job.id, records)
            last = records[-1]
            total = last.get("total_steps") or 0
            self.update(job.id, step=last["step"], last_loss=last.get("loss"), total_steps=total or None,
                        progress=last["step"] / total if total else 0)
        return inode, offset

    def metrics(self, job_id: str) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT step, loss, lr, eval_loss FROM metrics WHERE job_id = ? ORDER BY step",
                              (job_id,)).fetchall()
        return [dict(r) for r in rows]

    def loss_curves(self, job_ids: list[str] | None = None, points: int = 24) -> dict[str, list[float]]:
        """The training loss of the jobs `job_ids` (None: all) averaged into at most `points` buckets of steps, in
        one query: the web console draws a sparkline per job, and one query per job would not stay fast."""
        ids = tuple(job_ids or ())
        only = f"AND job_id IN ({','.join('?' * len(ids))})" if job_ids is not None else ""
        with self._db() as db:
            rows = db.execute(
                "SELECT m.job_id, CAST((m.step - 1) * ? / t.top AS INTEGER) AS bucket, AVG(m.loss) FROM metrics m "
                f"JOIN (SELECT job_id, MAX(step) AS top FROM metrics WHERE loss IS NOT NULL {only} GROUP BY job_id) t "
                "ON t.job_id = m.job_id WHERE m.loss IS NOT NULL GROUP BY m.job_id, bucket ORDER BY m.job_id, bucket",
                (points, *ids)).fetchall()
        curves: dict[str, list[float]] = {}
        for job_id, _, loss in rows:
            curves.setdefault(job_id, []).append(loss)
        return curves

    def heartbeat(self, worker: str, pid: int, host: str) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO workers VALUES (?,?,?,?)", (worker, pid, host, time.time()))

    def workers(self) -> list[dict]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM workers").fetchall()]

    def remove_worker(self, worker: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM workers WHERE id = ?", (worker,))


def _check_integrity(db: sqlite3.Connection) -> None:
    """SQLite's quick check: a truncated file, or one that is not SQLite at all, fails here, loudly, instead of
    reading as a store with no jobs."""
    result = db.execute("PRAGMA quick_check").fetchone()[0]
    if result != "ok":
        raise sqlite3.DatabaseError(f"integrity check: {result}")


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["secret_names"] = json.loads(data["secret_names"] or "[]")
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)
