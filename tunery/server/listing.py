"""The runs and jobs the console shows: every job in the store, and every run folder beside them that no job made
(a `tunery train` run), each as one `Entry` with its state, progress, loss curve, time and cost.

Run folders are found in the console's runs folder and in the folders that hold the jobs' runs. A run is named in
URLs by its folder name (made unique with a short hash when two folders share a name).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunery.jobs.store import Job, JobStore
from tunery.server.tail import records

FINISHED = "finished"  # a run folder with result.json and no job: `tunery train` ran it to its end


@dataclass
class Entry:
    key: str  # the run's name in URLs
    name: str
    run_dir: Path
    state: str
    model: str
    job: Job | None = None
    step: int = 0
    total_steps: int | None = None
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    elapsed: float | None = None
    cost: float | None = None
    created: float = 0.0

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0


def entries(store: JobStore, runs_dir: Path) -> list[Entry]:
    """Jobs and job-less run folders, newest first."""
    jobs = store.list(limit=100_000)
    curves = loss_curves(store, jobs)
    keys = run_keys(jobs, runs_dir)
    by_dir = {Path(j.run_dir): j for j in jobs}
    out = [_job_entry(j, keys.get(Path(j.run_dir), Path(j.run_dir).name), curves.get(j.id, [])) for j in jobs]
    out += [_run_entry(path, key) for path, key in keys.items() if path not in by_dir]
    return sorted(out, key=lambda e: e.created, reverse=True)


_CURVES: dict[tuple[Path, str], tuple[int, list[float]]] = {}  # (store, job id) -> (its step then, its curve)


def loss_curves(store: JobStore, jobs: list[Job]) -> dict[str, list[float]]:
    """Every job's sparkline; only the curves of jobs whose step moved since the last call are read again (a page
    of hundreds of finished jobs refreshed every few seconds reads almost nothing)."""
    stale = [j.id for j in jobs if _CURVES.get((store.path, j.id), (None,))[0] != j.step]
    if stale:
        fresh = store.loss_curves(stale if len(stale) < len(jobs) else None)
        step = {j.id: j.step for j in jobs}
        _CURVES.update({(store.path, i): (step[i], fresh.get(i, [])) for i in stale})
    return {j.id: _CURVES[(store.path, j.id)][1] for j in jobs}


def run_keys(jobs: list[Job], runs_dir: Path) -> dict[Path, str]:
    """Run folder -> its key: every job's folder, and the run folders (with a config.yaml) in the runs folder and
    in the folders holding the jobs' runs."""
    folders = {Path(j.run_dir) for j in jobs}
    for root in {runs_dir, *(p.parent for p in folders)}:
        if root.is_dir():
            folders.update(p for p in root.iterdir() if (p / "config.yaml").is_file())
    keys: dict[Path, str] = {}
    taken: set[str] = set()
    for path in sorted(folders):
        key = path.name if path.name not in taken else f"{path.name}~{hashlib.sha1(bytes(path)).hexdigest()[:6]}"
        taken.add(key)
        keys[path] = key
    return keys


def _job_entry(job: Job, key: str, losses: list[float]) -> Entry:
    return Entry(key=key, name=job.name, run_dir=Path(job.run_dir), state=job.state, model=job.model, job=job,
                 step=job.step, total_steps=job.total_steps, last_loss=job.last_loss, losses=losses,
                 elapsed=job.elapsed, cost=job.cost_so_far, created=job.created)


_RUNS: dict[Path, tuple[tuple, Entry]] = {}  # run folder -> (what its files looked like, its entry)


def _run_entry(path: Path, key: str) -> Entry:
    """A run folder no job made, read from its files (cached until they change)."""
    stamp = tuple(_stat(path / name) for name in ("config.yaml", "metrics.jsonl", "result.json"))
    cached = _RUNS.get(path)
    if cached and cached[0] == stamp:
        return cached[1]
    entry = Entry(key=key, name=path.name, run_dir=path, model=_model(path), created=stamp[0][0],
                  state=FINISHED if (path / "result.json").is_file() else "incomplete")
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        found = records(metrics.read_bytes())
        losses = [r["loss"] for r in found if r.get("loss") is not None]
        if found:
            entry.step, entry.total_steps = found[-1]["step"], found[-1].get("total_steps")
            entry.last_loss = losses[-1] if losses else None
        entry.losses = _buckets(losses, 24)
    _RUNS[path] = (stamp, entry)
    return entry


def _stat(path: Path) -> tuple[float, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (0.0, -1)
    return (st.st_mtime, st.st_size)


def _model(path: Path) -> str:
    try:
        return str((yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model") or "?")
    except (OSError, yaml.YAMLError, AttributeError):
        return "?"


def _buckets(values: list[float], points: int) -> list[float]:
    if len(values) <= points:
        return values
    size = len(values) / points
    parts = [values[int(i * size): int((i + 1) * size)] for i in range(points)]
    return [sum(p) / len(p) for p in parts if p]


def metrics_of(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records (for its chart)."""
    path = run_dir / "metrics.jsonl"
    return records(path.read_bytes()) if path.is_file() else []


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
