"""What the CLI and the web console both do to jobs: open the store (reconciled), launch a prepared job, cancel it,
retry it, bring a remote one up to date. One copy, so `tunery cancel` and the console's Cancel button behave
alike.

    store = open_store()
    job = launch(cfg, run_dir, est, flavor="local", backend="local")   # after tunery.jobs.submit.prepare
    cancel(store, job.id)
"""

from __future__ import annotations

from collections.abc import Callable

from tunery.config import RunConfig
from tunery.errors import TuneryError
from tunery.jobs.flavors import Estimate
from tunery.jobs.store import FINAL, Job, JobStore

RETRYABLE = tuple(s for s in FINAL if s != "succeeded")


def open_store() -> JobStore:
    """The job store, reconciled first (see `settle`)."""
    return settle(JobStore())


def settle(store: JobStore) -> JobStore:
    """Reconcile the store: a local job left 'running' by a worker that is gone is settled (queued again, or
    succeeded if its training had finished), and a worker is started to resume what was queued."""
    from tunery.jobs import submit
    from tunery.jobs.worker import reconcile

    if reconcile(store) and any(j.state == "queued" and j.backend == "local" for j in store.list(limit=1000)):
        submit.ensure_worker()
    return store


def launch(cfg: RunConfig, run_dir, est: Estimate, *, flavor: str, backend: str, timeout_s: int | None,
           budget_usd: float | None, secrets: list[str], address: str | None = None, output_repo: str | None = None,
           start_worker: bool = True) -> tuple[Job, bool]:
    """Queue a job prepared by `submit.prepare`, hand it to its remote backend, and start a background worker
    when none runs (a remote job is watched by it too). Returns the job and whether a worker was started."""
    from tunery.jobs import submit

    job = submit.queue(cfg, run_dir, est, flavor=flavor, backend=backend, timeout_s=timeout_s,
                       budget_usd=budget_usd, secrets=secrets)
    if backend != "local":
        submit_remote(job, address=address, output_repo=output_repo)
    return job, bool(start_worker and submit.ensure_worker())


def submit_remote(job: Job, address: str | None = None, output_repo: str | None = None) -> None:
    """Hand a queued job to its remote backend; any failure (a network error too) marks it failed, with why."""
    from tunery.jobs.backends import get_backend

    try:
        get_backend(job.backend, address=address, output_repo=output_repo).submit(job)
    except Exception as e:  # noqa: BLE001 - httpx, requests and Ray raise their own types: none may leave it queued
        why = str(e) if isinstance(e, TuneryError) else f"{type(e).__name__}: {e}"
        JobStore().set_state(job.id, "failed", f"submission to {job.backend} failed: {why}", expect=("queued",))
        raise TuneryError(f"submission to {job.backend} failed: {why}; the job is marked failed (`tunery jobs retry "
                          f"{job.id}` tries again)") from None


def cancel(store: JobStore, job_id: str) -> str:
    """Cancel a queued job at once ("cancelled") or ask a running one to stop ("requested": the worker stops it
    within seconds; a remote one is stopped through its backend's API now). A job that has ended is an error."""
    from tunery.jobs.secrets import drop_secrets

    job = store.get(job_id)
    outcome = store.cancel(job.id)
    if outcome == "cancelled":
        drop_secrets(job.id)
        return outcome
    if outcome != "requested":
        raise TuneryError(f"job {job.id} has already ended ({outcome}); nothing to cancel")
    if job.backend != "local":
        from tunery.jobs.backends import get_backend

        get_backend(job.backend).cancel(job)
        store.set_state(job.id, "cancelled", "cancelled by user", expect=("running",))
    return outcome


def retry(store: JobStore, job_id: str, timeout_s: int | None = None, budget_usd: float | None = None) -> Job:
    """Queue a failed, cancelled or timed-out job again; it resumes from its last checkpoint with a fresh allowance
    (its timeout and budget count from the new attempt; given ones replace the old)."""
    from tunery.jobs import submit
    from tunery.jobs.secrets import store_secrets

    job = store.get(job_id)
    if job.state not in RETRYABLE:
        raise TuneryError(f"job {job.id} is {job.state}; only failed, cancelled or timed-out jobs can be retried")
    if job.backend == "local":  # the secrets as this shell has them now: a rotated token takes effect
        store_secrets(job.id, job.secret_names)
    limits = {**({"timeout_s": timeout_s} if timeout_s else {}),
              **({"budget_usd": budget_usd} if budget_usd is not None else {})}
    if not store.set_state(job.id, "queued", "retried by user", expect=RETRYABLE, cancel_requested=0,
                           finished=None, used_s=0.0, returncode=None, **limits):
        raise TuneryError(f"job {job.id} changed state meanwhile ({store.get(job.id).state}); look again")
    if job.backend != "local":  # nothing polls a remote backend's queue: the job goes to the backend again now
        address = (job.external_id or "").rsplit("#", 1)[0] if job.backend == "ray" and job.external_id else None
        submit_remote(store.get(job.id), address=address or None)
    submit.ensure_worker()
    return store.get(job.id)


def refreshed(job: Job, warn: Callable[[str], None] | None = None) -> Job:
    """A remote job with its state brought up to date (left as stored when the backend is unreachable, with a
    word to `warn`)."""
    if job.backend == "local" or job.state != "running":
        return job
    from tunery.jobs.backends import get_backend

    try:
        return get_backend(job.backend).refresh(job)
    except (TuneryError, OSError) as e:
        if warn:
            warn(f"could not refresh {job.id} from {job.backend}: {e}")
        return job
