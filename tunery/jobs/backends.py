"""Remote job backends behind one Protocol: Ray (Jobs API) and Hugging Face Jobs.

The local backend is the worker (tunery/jobs/worker.py). A remote backend submits the same training
(`tunery train --config RUN/config.yaml`, or the generated PEP 723 script for HF Jobs) and maps the
remote state back into the store, so `tunery jobs`, `logs` and `cancel` work the same for all.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Protocol

from tunery.config import RunConfig
from tunery.errors import TuneryError
from tunery.jobs.store import Job, JobStore


class Backend(Protocol):
    name: str

    def submit(self, job: Job) -> str: ...

    def refresh(self, job: Job) -> Job: ...

    def logs(self, job: Job) -> str: ...

    def cancel(self, job: Job) -> None: ...


_RAY_STATES = {"PENDING": "running", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
               "STOPPED": "cancelled"}


class RayBackend:
    """Ray Jobs API. The cluster must see the run folder (same machine, or shared storage) and have
    tunery installed; secrets travel as the job's environment variables."""

    name = "ray"

    def __init__(self, address: str | None = None, store: JobStore | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
        self.store = store or JobStore()

    def _client(self, address: str | None = None):
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise TuneryError("the ray backend needs Ray: pip install 'tunery[ray]'") from None
        try:
            return JobSubmissionClient(address or self.address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise TuneryError(f"cannot reach the Ray cluster at {address or self.address} ({e}); start one "
                              "with `ray start --head` or pass --address") from None

    def submit(self, job: Job) -> str:
        env = {"PYTHONUNBUFFERED": "1", "TUNERY_JOB_ID": job.id}
        missing = [n for n in job.secret_names if n not in os.environ]
        if missing:
            raise TuneryError(f"secret(s) {', '.join(missing)} are not set in this environment")
        env.update({n: os.environ[n] for n in job.secret_names})
        from tunery.jobs.worker import train_command

        # a retry continues the run folder from its last checkpoint, under a submission id of its own
        entrypoint = shlex.join(["tunery", *train_command(Path(job.run_dir))[3:]])
        submission = self._client().submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env},
                                               submission_id=f"tunery-{job.id}-{job.attempts + 1}")
        external = f"{self.address}#{submission}"
        self.store.set_state(job.id, "running", f"submitted to Ray at {self.address} as {submission}",
                             expect=("queued",), **_attempt(job, external))
        return external

    def _split(self, job: Job) -> tuple:
        address, submission = (job.external_id or "#").rsplit("#", 1)
        return self._client(address), submission

    def refresh(self, job: Job) -> Job:
        if job.state != "running" or not job.external_id:
            return job
        self.store.ingest_metrics(job)  # the run folder is shared with the cluster
        client, submission = self._split(job)
        status = str(client.get_job_status(submission)).rsplit(".", 1)[-1]
        state = _RAY_STATES.get(status, "running")
        if state != "running":
            self.store.set_state(job.id, state, f"Ray reports {status}", expect=("running",), used_s=job.elapsed)
        elif job.overrun():  # Ray knows no budget: the job is stopped through its API
            client.stop_job(submission)
            _stopped(self.store, job)
        return self.store.get(job.id)

    def logs(self, job: Job) -> str:
        client, submission = self._split(job)
        return client.get_job_logs(submission)

    def cancel(self, job: Job) -> None:
        client, submission = self._split(job)
        client.stop_job(submission)


class HFJobsBackend:
    """Hugging Face Jobs (tunery.jobs.hf_jobs): the run lives in the job's output repo; a refresh copies its
    metrics here, stops a job past its budget through the Jobs API, and downloads the finished run."""

    name = "hf-jobs"

    def __init__(self, store: JobStore | None = None, output_repo: str | None = None):
        self.store = store or JobStore()
        self.output_repo = output_repo

    def submit(self, job: Job) -> str:
        from tunery.jobs import hf_jobs

        cfg = RunConfig.from_yaml(Path(job.run_dir) / "config.yaml")
        hf_jobs.check_remote_ready(cfg)
        script = Path(job.run_dir) / f"{cfg.name}.py"
        script.write_text(hf_jobs.make_script(cfg))
        # a retry goes to the repo of the earlier attempts, where its checkpoint is
        remote, repo = hf_jobs.submit_script(script, cfg, flavor=job.flavor, timeout_s=job.timeout_s,
                                             secret_names=job.secret_names,
                                             output_repo=job.output_repo or self.output_repo)
        self.store.set_state(job.id, "running", f"submitted to Hugging Face Jobs as {remote}; its run is kept "
                             f"in https://huggingface.co/{repo}", expect=("queued",), output_repo=repo,
                             **_attempt(job, remote))
        return remote

    def refresh(self, job: Job) -> Job:
        if job.state != "running" or not job.external_id:
            return job
        from tunery.jobs import hf_jobs

        stage = hf_jobs.stage(job.external_id)
        if job.output_repo and hf_jobs.pull_metrics(job.output_repo, Path(job.run_dir)):
            self.store.ingest_metrics(job)
        states = {"COMPLETED": "succeeded", "ERROR": "failed", "CANCELED": "cancelled", "DELETED": "cancelled"}
        if stage in states:
            if stage == "COMPLETED" and job.output_repo:
                hf_jobs.pull_finished_run(job.output_repo, Path(job.run_dir))
            self.store.set_state(job.id, states[stage], f"Hugging Face Jobs reports {stage}", expect=("running",),
                                 used_s=job.elapsed)
        elif job.overrun():  # the Jobs API enforces a timeout, not a budget: past either, tunery cancels it
            self.cancel(job)
            _stopped(self.store, job)
        return self.store.get(job.id)

    def logs(self, job: Job) -> str:
        from huggingface_hub import fetch_job_logs

        return "".join(f"{line}\n" for line in fetch_job_logs(job_id=job.external_id, follow=False))

    def cancel(self, job: Job) -> None:
        from huggingface_hub import cancel_job

        cancel_job(job_id=job.external_id)


def _attempt(job: Job, external_id: str) -> dict:
    """The store fields of a new attempt on a remote backend: its clock starts now (timeout and budget)."""
    return {"external_id": external_id, "attempts": job.attempts + 1, "attempt_started": time.time()}


def _stopped(store: JobStore, job: Job) -> None:
    state, why = job.overrun()
    store.set_state(job.id, state, f"{why}; stopped through the {job.backend} API (`tunery jobs retry {job.id}` "
                    "resumes from its last checkpoint)", expect=("running",), used_s=job.elapsed)


def get_backend(name: str, address: str | None = None, output_repo: str | None = None) -> Backend:
    if name == "ray":
        return RayBackend(address)
    if name == "hf-jobs":
        return HFJobsBackend(output_repo=output_repo)
    raise TuneryError(f"no remote backend {name!r}; remote backends: ray, hf-jobs")
