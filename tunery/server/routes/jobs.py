"""Runs and jobs: the list (refreshed live), one job's page (loss chart, log and state streamed), cancel and retry.

Everything about jobs goes through tunery.jobs (the store, reconciled as the CLI reconciles it; cancel and retry
as `tunery cancel` and `tunery jobs retry` do them), so the console and the CLI see and change the same jobs.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse

from tunery.errors import TuneryError
from tunery.jobs import control
from tunery.jobs.flavors import parse_duration, parse_money
from tunery.jobs.store import FINAL, Job, JobStore
from tunery.run import trained_weights
from tunery.server.listing import entries, run_keys
from tunery.server.tail import Tail, last_record, records
from tunery.server.web import NotFound, job_store, page, settings, stopping

router = APIRouter()

LOG_TAIL_BYTES = 64 * 1024  # a job page opens on this much of the end of a long log
KEEPALIVE_S = 15.0


def find_job(store: JobStore, job_id: str) -> Job:
    try:
        return store.get(job_id)
    except TuneryError as e:
        raise NotFound(str(e)) from None


@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    return page(request, "jobs.html", entries=entries(job_store(request), settings(request).runs_dir))


@router.get("/jobs/table", response_class=HTMLResponse)
def jobs_table(request: Request) -> HTMLResponse:
    return page(request, "_jobs_table.html", entries=entries(job_store(request), settings(request).runs_dir))


@router.get("/api/jobs")
def jobs_json(request: Request) -> list[dict]:
    return [{"id": e.job.id if e.job else None, "run": e.key, "name": e.name, "state": e.state, "model": e.model,
             "step": e.step, "total_steps": e.total_steps, "last_loss": e.last_loss, "elapsed_s": e.elapsed,
             "cost_usd": e.cost} for e in entries(job_store(request), settings(request).runs_dir)]


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    store = job_store(request)
    job = find_job(store, job_id)
    return page(request, "job.html", **_summary(request, store, job))


@router.get("/jobs/{job_id}/summary", response_class=HTMLResponse)
def job_summary(request: Request, job_id: str) -> HTMLResponse:
    store = job_store(request)
    return page(request, "_job_summary.html", **_summary(request, store, _fresh(find_job(store, job_id))))


@router.get("/jobs/{job_id}/log")
def job_log(request: Request, job_id: str) -> FileResponse:
    """The whole job.log (the page streams its end)."""
    job = find_job(job_store(request), job_id)
    path = Path(job.run_dir) / "job.log"
    if not path.is_file():
        raise NotFound(f"job {job.id} has no log yet")
    return FileResponse(path, filename=f"{job.id}.log", media_type="text/plain")


@router.post("/jobs/{job_id}/cancel", response_class=HTMLResponse)
def cancel_job(request: Request, job_id: str) -> HTMLResponse:
    store = job_store(request)
    job = find_job(store, job_id)
    outcome = control.cancel(store, job.id)
    note = "cancelled" if outcome == "cancelled" else "cancel requested: the job stops within seconds"
    return page(request, "_job_summary.html", note=note, **_summary(request, store, store.get(job.id)))


@router.post("/jobs/{job_id}/retry", response_class=HTMLResponse)
async def retry_job(request: Request, job_id: str) -> HTMLResponse:
    form = await request.form()
    timeout, budget = str(form.get("timeout") or "").strip(), str(form.get("budget") or "").strip()
    store = job_store(request)
    job = control.retry(store, find_job(store, job_id).id, timeout_s=parse_duration(timeout) if timeout else None,
                        budget_usd=parse_money(budget) if budget else None)
    return page(request, "_job_summary.html", note="queued again: it resumes from its last checkpoint",
                **_summary(request, store, job))


_REFRESHED: dict[str, float] = {}  # remote job id -> when the page last asked its backend


def _fresh(job: Job, every_s: float = 10.0) -> Job:
    """A running remote job brought up to date at most every `every_s` (the worker does it every 30 s anyway)."""
    if job.backend == "local" or job.state != "running" or time.time() - _REFRESHED.get(job.id, 0) < every_s:
        return job
    _REFRESHED[job.id] = time.time()
    return control.refreshed(job)


def _summary(request: Request, store: JobStore, job: Job) -> dict:
    run = Path(job.run_dir)
    last = last_record(run / "metrics.jsonl") or {}
    eta = None
    if job.state == "running" and job.step and job.total_steps:
        eta = job.elapsed / job.step * (job.total_steps - job.step)
    try:
        trained_weights(run)
        finished = True
    except TuneryError:
        finished = False
    keys = run_keys([job], settings(request).runs_dir)
    return {"job": job, "transitions": store.transitions(job.id), "last": last, "eta": eta,
            "run_key": keys.get(run, run.name) if finished else None, "final": job.state in FINAL,
            "retryable": job.state in control.RETRYABLE}


@router.get("/api/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str, tick: float = 1.0) -> StreamingResponse:
    """Server-sent events: `metrics` (new metrics.jsonl records), `log` (new job.log text), `state`, `reset` (the
    metrics file was rewritten by a resume: draw again), `end`. Each tick reads only the bytes added since the
    last; the event id is where the stream is, so a reconnect (Last-Event-ID) resumes there."""
    store = job_store(request)
    job = find_job(store, job_id)
    metrics_at, _, log_at = request.headers.get("last-event-id", "").partition("|")
    metrics = Tail.from_cursor(Path(job.run_dir) / "metrics.jsonl", metrics_at)
    log = Tail.from_cursor(Path(job.run_dir) / "job.log", log_at, lines=False)
    if not log_at:
        log.skip_to_last(LOG_TAIL_BYTES)
    stream = _events(request, store, job, metrics, log, max(0.1, tick))
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(request: Request, store: JobStore, job: Job, metrics: Tail, log: Tail,
                  tick: float) -> AsyncIterator[str]:
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
    state, quiet_since = None, time.time()
    while not await request.is_disconnected() and not stopping(request):
        job = store.get(job.id)
        new, reset = metrics.read()
        text = decode.decode(log.read()[0])
        cursor = f"{metrics.cursor}|{log.cursor}"
        out = [_sse("reset", {}, cursor)] if reset else []
        if new:
            out.append(_sse("metrics", records(new), cursor))
        if text:
            out.append(_sse("log", text, cursor))
        if job.state != state:
            state = job.state
            out.append(_sse("state", {"state": state, "step": job.step, "total_steps": job.total_steps}, cursor))
        if out:
            quiet_since = time.time()
            yield "".join(out)
        elif time.time() - quiet_since > KEEPALIVE_S:
            quiet_since = time.time()
            yield ": keep-alive\n\n"
        if state in FINAL and not new and not text:
            yield _sse("end", {"state": state}, cursor)
            return
        await asyncio.sleep(tick)


def _sse(event: str, data, cursor: str) -> str:
    return f"event: {event}\nid: {cursor}\ndata: {json.dumps(data)}\n\n"
