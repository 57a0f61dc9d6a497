"""`tunery compare RUN1 RUN2 ...` ranks finished runs; `tunery compare --models A B C --data FILE` queues one job
per model on the same held-out rows, seed and settings (and with --wait, ranks them when they finish)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import typer
from rich.table import Table

from tunery.progress import console
from tunery.progress import report as out


def compare_command(
    items: list[str] = typer.Argument(..., help="Run folders (or a folder `--models` wrote); with --models, the "
                                                "models to train: Hub ids or local folders."),
    models: bool = typer.Option(False, "--models", help="The arguments are models: train one job per model on "
                                                        "the same split, seed and settings."),
    data: str | None = typer.Option(None, "--data", help="--models: the training data (split once)."),
    metric: str = typer.Option("exact_match", "--metric", help="Rank by exact_match, rouge_l or loss."),
    out_dir: Path | None = typer.Option(None, "--out", help="Where report.md and loss.png go (--models: also the "
                                                            "split and compare.json); default compare-<time>."),
    config: Path | None = typer.Option(None, "--config", help="--models: a run config YAML of shared settings."),
    method: str | None = typer.Option(None, "--method", help="--models: lora, qlora or full."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="--models: optimizer steps each."),
    epochs: float | None = typer.Option(None, "--epochs", help="--models: passes over the data."),
    lr: float | None = typer.Option(None, "--lr", help="--models: peak learning rate."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="--models: examples per micro-batch."),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", help="--models: longer rows are truncated."),
    eval_split: float | None = typer.Option(None, "--eval-split", help="--models: share of rows held out."),
    seed: int | None = typer.Option(None, "--seed", help="--models: the split's and each run's seed."),
    output_dir: str | None = typer.Option(None, "--output-dir", help="--models: where the run folders go."),
    flavor: str = typer.Option("local", "--flavor", help="--models: hardware flavor of each job."),
    backend: str = typer.Option("local", "--backend", help="--models: local, ray or hf-jobs."),
    wait: bool = typer.Option(False, "--wait", help="--models: wait for the jobs, then evaluate and rank them."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Do not run `tunery eval` on runs not evaluated yet."),
    samples: int | None = typer.Option(None, "--samples", help="Held-out prompts each evaluation generates."),
) -> None:
    """A leaderboard of several runs on the same data: held-out loss, exact match, ROUGE-L, sample answers, train
    time, cost, adapter and GGUF size, ranked by one metric; printed and written to report.md with loss.png."""
    from tunery.advisor.compare import queue_models, runs_of, wait_for
    from tunery.advisor.leaderboard import METRICS
    from tunery.config import ConfigError, RunConfig

    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
    folder = out_dir or Path(f"compare-{dt.datetime.now():%Y%m%d-%H%M%S}")
    if models:
        base = RunConfig.from_yaml(config) if config else RunConfig()
        base = base.replace(data=data, method=method, max_steps=max_steps, epochs=epochs, lr=lr,
                            batch_size=batch_size, max_seq_len=max_seq_len, eval_split=eval_split, seed=seed,
                            output_dir=output_dir)
        base = base.with_absolute_paths(config.resolve().parent if config else Path.cwd())
        jobs = queue_models(items, base, folder.resolve(), flavor=flavor, backend=backend)
        for job in jobs:
            console.print(f"queued job {job.id}: {job.model} -> {job.run_dir}")
        if not wait:
            console.print(f"same split, seed and settings; when they finish: tunery compare {folder}")
            return
        states = wait_for([j.id for j in jobs], on_change=lambda j, s: console.print(f"job {j}: {s}"))
        runs = [j.run_dir for j in jobs if states[j.id] == "succeeded"]
        failed = [f"{j.model} ({states[j.id]})" for j in jobs if states[j.id] != "succeeded"]
        if failed:
            console.print(f"[yellow]not compared:[/] {', '.join(failed)} (`tunery jobs` shows why)")
    else:
        runs = runs_of(items)
    _rank(runs, metric, folder, evaluate=not no_eval, samples=samples)


def _rank(runs: list[str], metric: str, folder: Path, evaluate: bool, samples: int | None) -> None:
    from tunery.advisor.leaderboard import HEADER, leaderboard, table_rows, write_report

    if evaluate:
        from tunery.eval.evaluate import evaluate_run

        for run in runs:
            if not (Path(run) / "eval" / "report.json").is_file():
                console.print(f"evaluating {run}")
                evaluate_run(run, samples=samples)
    board = leaderboard(runs, metric)
    table = Table(title=f"leaderboard (by {metric})")
    for col in HEADER:
        table.add_column(col, no_wrap=col in ("#", "run"), overflow="fold")
    for row in table_rows(board):
        table.add_row(*row)
    out.print(table)
    note = board.held_out_note()
    out.print(note if board.same_held_out else f"[yellow]{note}[/]")
    for s in board.samples(limit=3):
        out.print(f"  {s['prompt'][:80]!r} -> reference {s['reference'][:40]!r}; "
                  + "; ".join(f"{e.name}: {a[:40]!r}" for e, a in zip(board.entries, s["answers"])), highlight=False)
    console.print(f"report: {write_report(board, folder)}")
