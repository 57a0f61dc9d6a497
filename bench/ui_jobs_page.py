"""How fast the web console's runs and jobs page renders with a full store: fills a TUNERY_HOME with N jobs (each with
a run folder and M metrics rows), then times GET / (and the table htmx refreshes, GET /jobs/table) through FastAPI's
TestClient. Prints the first request's time (it reads every job's sparkline; later ones read only those of jobs that
moved), and the median and the worst of R more.

    PYTHONPATH=. .venv/bin/python bench/ui_jobs_page.py [--jobs 500] [--steps 200] [--repeat 20]

The page reconciles the store (as every CLI command that reads it does), reads every job, one query's worth of loss
sparklines, and the run folders beside them. Nothing trains; the jobs are written straight into the store.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

STATES = ("succeeded", "failed", "cancelled", "timed-out", "queued")


def fill(home: Path, jobs: int, steps: int) -> None:
    """`jobs` jobs in the store, all states but running (nothing may start a worker), with `steps` metrics each."""
    from tunery.config import RunConfig
    from tunery.jobs.store import JobStore

    store = JobStore(home / "jobs.sqlite")
    runs = home / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for i in range(jobs):
        run = runs / f"bench-{i:04d}"
        run.mkdir()
        RunConfig(model="Qwen/Qwen2.5-0.5B-Instruct", data="data.jsonl", name=run.name).to_yaml(run / "config.yaml")
        job = store.add(name=run.name, model="Qwen/Qwen2.5-0.5B-Instruct", backend="local", flavor="local",
                        run_dir=str(run), timeout_s=None, budget_usd=None, usd_per_hour=0.0, estimate=None,
                        secret_names=[])
        store.add_metrics(job.id, [{"step": s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, steps + 1)])
        store.update(job.id, step=steps, total_steps=steps, last_loss=3.0 / steps, progress=1.0)
        state = STATES[i % len(STATES)]
        if state != "queued":
            store.set_state(job.id, state, "bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--steps", type=int, default=200, help="metrics rows per job")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        os.environ["TUNERY_HOME"] = str(home)
        from fastapi.testclient import TestClient

        from tunery.server.app import create_app

        t0 = time.perf_counter()
        fill(home, args.jobs, args.steps)
        print(f"filled {args.jobs} jobs x {args.steps} metrics rows in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr)
        client = TestClient(create_app(home), base_url="http://127.0.0.1")
        for path in ("/", "/jobs/table"):
            start = time.perf_counter()
            first = client.get(path)
            print(f"GET {path:<12} first request (every sparkline read): {(time.perf_counter() - start) * 1000:.0f} ms")
            assert first.status_code == 200 and first.text.count("<tr data-state") == args.jobs, path
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                client.get(path)
                times.append(time.perf_counter() - start)
            print(f"GET {path:<12} {args.jobs} jobs: median {statistics.median(times) * 1000:.0f} ms, "
                  f"worst {max(times) * 1000:.0f} ms over {args.repeat} requests")


if __name__ == "__main__":
    main()
