"""What a Hugging Face job runs: the training, with its run folder kept in a Hub repo so no attempt is lost.

A job's disk goes with the job. With TUNERY_OUTPUT_REPO set (the backend always sets it):
- at the start, an earlier attempt's run folder (config, metrics, latest checkpoint) is pulled from the repo and
  the training resumes from that checkpoint: this is how `tunery jobs retry` continues on Hugging Face Jobs;
- while it trains, each new checkpoint (every `save_every` steps) is pushed with the metrics so far, replacing
  the previous one in the repo, so a timeout, a cancel or a crash loses at most `save_every` steps;
- at the end, or when the job is stopped (SIGTERM: a cancel, a timeout), the run folder is pushed as it stands.
  A finished run keeps no checkpoint in the repo: its adapter or model is what is left.

This module runs on the job's machine (the generated script calls `run_job`); tunery.jobs.hf_jobs is the
submitting side.
"""

from __future__ import annotations

import base64
import gzip
import os
import signal
import threading
from pathlib import Path

import yaml

from tunery.train.checkpoint import list_checkpoints

SCRIPT_NAME = "tunery-job.py"  # the job's script, kept in the output repo beside the run
PUSH_POLL_S = 1.0  # how often the pusher looks for a new checkpoint (a listing: cheap)
# what of a run folder goes to the repo besides checkpoints and trained weights (never lock or temp files)
_SKIP = [".*", "**/.*", "*.tmp/*", "checkpoints/*"]


def run_job(config_yaml: str, data: dict[str, tuple[str, str]], work: Path | None = None) -> Path:
    """Unpack the inline data, train (resuming an earlier attempt's run from the repo), push the run."""
    from tunery.config import RunConfig
    from tunery.train import train

    work = (work or Path(os.environ.get("TUNERY_JOB_DIR", "tunery-job"))).resolve()
    (work / "data").mkdir(parents=True, exist_ok=True)
    values = yaml.safe_load(config_yaml)
    for key, (filename, blob) in data.items():
        path = work / "data" / filename
        path.write_bytes(gzip.decompress(base64.b64decode(blob)))
        values[key] = str(path)
    values["output_dir"] = str(work / "runs")
    cfg = RunConfig.from_dict(values, source="job config")
    repo = os.environ.get("TUNERY_OUTPUT_REPO")
    if not repo:
        run = train(cfg)
        print(f"run folder: {run} (set TUNERY_OUTPUT_REPO to keep it after the job ends)", flush=True)
        return run

    from huggingface_hub import HfApi

    api = HfApi()
    run = Path(cfg.output_dir) / cfg.name
    resume = pull_run(api, repo, run)
    if resume:
        cfg.to_yaml(run / "config.yaml")  # this machine's paths: the data was unpacked afresh above
    pusher = CheckpointPusher(api, repo, run)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    pusher.start()
    finished = False
    try:
        train(cfg, resume=run if resume else None)
        finished = True
    finally:
        pusher.stop()
        signal.signal(signal.SIGTERM, previous)
        push_run(api, repo, run, finished=finished)
    return run


def pull_run(api, repo: str, run: Path) -> bool:
    """Download an earlier attempt's run folder from `repo` into `run`; False when the repo holds none."""
    from huggingface_hub import snapshot_download

    files = api.list_repo_files(repo)
    if "config.yaml" not in files:
        print(f"{repo} holds no earlier attempt: starting the run", flush=True)
        return False
    snapshot_download(repo_id=repo, local_dir=run, ignore_patterns=[SCRIPT_NAME, ".gitattributes"])
    saved = list_checkpoints(run / "checkpoints")
    print(f"pulled the run of an earlier attempt from {repo}: "
          f"{f'resuming from {saved[-1].name}' if saved else 'no checkpoint yet, starting over'}", flush=True)
    return True


def push_run(api, repo: str, run: Path, *, checkpoint: Path | None = None, finished: bool = False) -> None:
    """Push the run folder's files, with `checkpoint` (default: the latest) in place of the repo's older ones;
    a finished run pushes its trained weights and drops the checkpoints from the repo."""
    if not finished and checkpoint is None:
        saved = list_checkpoints(run / "checkpoints")
        checkpoint = saved[-1] if saved else None
    allow = None if finished or checkpoint is None else [f"checkpoints/{checkpoint.name}/*", "*.json", "*.jsonl",
                                                         "*.yaml", "*.log"]
    skip = [*_SKIP] if finished or checkpoint is None else [p for p in _SKIP if p != "checkpoints/*"]
    what = "the finished run" if finished else checkpoint.name if checkpoint else "the run (no checkpoint yet)"
    api.upload_folder(folder_path=str(run), repo_id=repo, allow_patterns=allow, ignore_patterns=skip,
                      delete_patterns=["checkpoints/**"] if finished or checkpoint else None,
                      commit_message=f"tunery: {what}")
    print(f"pushed {what} to {repo}", flush=True)


class CheckpointPusher(threading.Thread):
    """Pushes each new complete checkpoint of `run` while the training goes on (a failed push is retried at
    the next poll; the training never waits for it)."""

    def __init__(self, api, repo: str, run: Path, poll_s: float = PUSH_POLL_S):
        super().__init__(name="tunery-checkpoint-pusher", daemon=True)
        self.api, self.repo, self.run_dir, self.poll_s = api, repo, run, poll_s
        self.pushed: str | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self.poll_s):
            self.push_new()

    def push_new(self) -> None:
        saved = list_checkpoints(self.run_dir / "checkpoints")
        if not saved or saved[-1].name == self.pushed:
            return
        try:
            push_run(self.api, self.repo, self.run_dir, checkpoint=saved[-1])
            self.pushed = saved[-1].name
        except Exception as e:  # noqa: BLE001 - a network error or a checkpoint pruned mid-push: try again later
            print(f"could not push {saved[-1].name} to {self.repo} ({type(e).__name__}: {e}); trying again",
                  flush=True)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")
