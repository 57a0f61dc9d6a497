"""Job verbs: `tunery submit`, `tunery jobs [show|retry]`, `tunery logs`, `tunery cancel`, `tunery worker`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from tunery.progress import console
from tunery.progress import report as out

app = typer.Typer(help="List and inspect jobs (`tunery jobs` lists them).", invoke_without_command=True)

_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    if len(values) > width:  # average into `width` buckets
        step = len(values) / width
        buckets = [values[int(i * step): int((i + 1) * step)] for i in range(width)]
        values = [sum(b) / len(b) for b in buckets]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_SPARK[min(7, int((v - low) / span * 7.999))] for v in values)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def submit_command(
    config: Path = typer.Option(..., "--config", "-c", help="Run config YAML (same keys as `tunery train`)."),
    name: str | None = typer.Option(None, "--name", help="Run/job name (default: from the config or model)."),
    flavor: str = typer.Option("local", "--flavor", help="Hardware flavor (see tunery/jobs/flavors.yaml)."),
    timeout: str | None = typer.Option(None, "--timeout", help="Stop the job after this long, e.g. 30m, 4h."),
    budget: str | None = typer.Option(None, "--budget", help="Refuse or stop past this cost, e.g. 5usd."),
    secret: list[str] = typer.Option([], "--secret", help="Environment variable NAME passed to the job only."),
    backend: str = typer.Option("local", "--backend", help="local, ray or hf-jobs."),
    address: str | None = typer.Option(None, "--address", help="Ray dashboard address (ray backend)."),
    output_repo: str | None = typer.Option(None, "--output-repo", help="Hub repo the hf-jobs run is pushed to."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Start even when the estimate exceeds the budget."),
    no_worker: bool = typer.Option(False, "--no-worker", help="Queue only; do not start a local worker."),
) -> None:
    """Queue a training job; prints its id and the estimated time and cost first."""
    from tunery.config import RunConfig
    from tunery.jobs import control, submit
    from tunery.jobs.flavors import money, parse_duration, parse_money

    cfg = RunConfig.from_yaml(config)
    if name:
        cfg = cfg.replace(name=name)
    cfg, run_dir, est = submit.prepare(cfg, flavor, backend, base=config.resolve().parent)
    timeout_s = parse_duration(timeout) if timeout else None
    budget_usd = parse_money(budget) if budget is not None else None
    console.print(est.describe())
    if budget_usd is not None and est.usd > budget_usd and not yes:
        console.print(f"[red]refused:[/] the estimate {money(est.usd)} exceeds the budget {money(budget_usd)}; "
                      "raise --budget, pick a cheaper --flavor, or pass --yes to start anyway")
        raise typer.Exit(3)
    job, started = control.launch(cfg, run_dir, est, flavor=flavor, backend=backend, timeout_s=timeout_s,
                                  budget_usd=budget_usd, secrets=list(secret), address=address,
                                  output_repo=output_repo, start_worker=not no_worker)
    if started:
        console.print("started a background worker (log: TUNERY_HOME/worker.log)")
    out.print(job.id)
    console.print(f"queued job {job.id} ({job.run_dir}); follow it with `tunery logs {job.id} -f`")


def _store():
    from tunery.jobs.control import open_store

    return open_store()


@app.callback()
def list_jobs(ctx: typer.Context, limit: int = typer.Option(30, "--limit", help="How many recent jobs.")) -> None:
    """List recent jobs."""
    if ctx.invoked_subcommand:
        return
    from tunery.jobs.flavors import money

    table = Table()
    for col in ("id", "name", "model", "backend", "state", "progress", "loss", "elapsed", "cost"):
        table.add_column(col, no_wrap=col in ("id", "state", "progress"), overflow="fold")
    for job in map(_refreshed, _store().list(limit)):
        progress = f"{job.step}/{job.total_steps}" if job.total_steps else "-"
        table.add_row(job.id, job.name, Path(job.model).name, job.backend, job.state, progress,
                      f"{job.last_loss:.4f}" if job.last_loss is not None else "-", _duration(job.elapsed),
                      money(job.cost_so_far))
    out.print(table)


@app.command("show")
def show_job(job_id: str = typer.Argument(..., help="Job id (a unique prefix is enough).")) -> None:
    """One job in full: settings, state history, loss sparkline, and a failed job's last log lines."""
    from tunery.jobs.flavors import money

    store = _store()
    job = _refreshed(store.get(job_id))
    table = Table(show_header=False, title=f"job {job.id}")
    for key in ("name", "model", "backend", "flavor", "state", "run_dir", "estimate", "timeout_s", "budget_usd",
                "attempts", "external_id"):
        table.add_row(key, str(getattr(job, key)))
    table.add_row("secrets", ", ".join(job.secret_names) or "-")
    table.add_row("progress", f"{job.step}/{job.total_steps or '?'}")
    table.add_row("elapsed / cost", f"{_duration(job.elapsed)} / {money(job.cost_so_far)}")
    out.print(table)
    for t in store.transitions(job.id):
        out.print(f"  {time.strftime('%H:%M:%S', time.localtime(t['at']))}  {t['state']:<10} {t['reason']}")
    losses = [m["loss"] for m in store.metrics(job.id) if m["loss"] is not None]
    if losses:
        out.print(f"loss {losses[0]:.4f} {sparkline(losses)} {losses[-1]:.4f}  ({len(losses)} steps)")
    log = Path(job.run_dir) / "job.log"
    if job.state == "failed" and log.is_file():  # the cause is in the training's own words
        tail = log.read_text(errors="replace").splitlines()[-15:]
        out.print(f"last lines of {log}:\n" + "\n".join(f"  {line}" for line in tail))


@app.command("retry")
def retry_job(
    job_id: str = typer.Argument(...),
    timeout: str | None = typer.Option(None, "--timeout", help="A new timeout for this and later attempts."),
    budget: str | None = typer.Option(None, "--budget", help="A new budget for this and later attempts."),
) -> None:
    """Queue a finished (failed, cancelled, timed-out) job again; it resumes from its last checkpoint, with a
    fresh allowance: its timeout and budget count from the new attempt."""
    from tunery.jobs import control
    from tunery.jobs.flavors import parse_duration, parse_money

    job = control.retry(_store(), job_id, timeout_s=parse_duration(timeout) if timeout else None,
                        budget_usd=parse_money(budget) if budget is not None else None)
    console.print(f"job {job.id} queued again")


def logs_command(
    job_id: str = typer.Argument(..., help="Job id (a unique prefix is enough)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """Print a job's log (the output of its `tunery train`)."""
    import sys

    from tunery.jobs.store import FINAL

    store = _store()
    job = store.get(job_id)
    if job.backend != "local":
        _remote_logs(job, follow)
        return
    path = Path(job.run_dir) / "job.log"
    offset, polls = 0, 0
    while True:
        polls += 1
        if follow and polls % 10 == 0:  # every 5 s: a worker that vanished must not leave this waiting forever
            _store()
        if path.exists():
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        if not follow or store.get(job.id).state in FINAL:
            break
        time.sleep(0.5)


def _refreshed(job):
    from tunery.jobs.control import refreshed

    return refreshed(job, warn=lambda text: console.print(f"[yellow]{text}[/]"))


def _remote_logs(job, follow: bool) -> None:
    import sys

    from tunery.jobs.backends import get_backend
    from tunery.jobs.store import FINAL

    backend, shown = get_backend(job.backend), 0
    while True:
        text = backend.logs(job)
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
        job = backend.refresh(job)
        if not follow or job.state in FINAL:
            if follow:
                sys.stdout.write(backend.logs(job)[shown:])
            break
        time.sleep(1)


def cancel_command(job_id: str = typer.Argument(..., help="Job id (a unique prefix is enough).")) -> None:
    """Cancel a queued job at once, or ask the worker to stop a running one (within seconds)."""
    from tunery.jobs.control import cancel

    store = _store()
    job = store.get(job_id)
    if cancel(store, job.id) == "cancelled":
        console.print(f"job {job.id} cancelled")
        return
    console.print(f"cancel requested for job {job.id}")


def worker_command(
    exit_when_idle: float | None = typer.Option(None, "--exit-when-idle",
                                                help="Exit after this many seconds with nothing to run."),
    slots: int | None = typer.Option(None, "--slots", help="Jobs at once (default: one per GPU, 1 on CPU)."),
) -> None:
    """Run queued local jobs (one per free GPU; one at a time on CPU) until stopped."""
    from tunery.jobs.worker import LocalWorker

    worker = LocalWorker(slots=slots)
    console.print(f"worker {worker.id}: {worker.slots} slot(s)")
    worker.run(exit_when_idle)
