"""`tunery eval RUN`: base vs fine-tuned on the run's held-out data."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tunery.progress import report as console


def eval_command(
    run: Path = typer.Argument(..., help="Run folder written by `tunery train`."),
    samples: int | None = typer.Option(None, "--samples", help="Held-out prompts to generate (0 = all)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: the run's)."),
    allow_changed_data: bool = typer.Option(False, "--allow-changed-data",
                                            help="Evaluate even if the data file changed since training."),
    gguf: list[Path] = typer.Option([], "--gguf", help="Score this exported GGUF file through llama.cpp beside the "
                                                       "fine-tuned torch model (repeatable)."),
) -> None:
    """Held-out loss, perplexity, exact match and ROUGE-L of the base and the fine-tuned model (or, with --gguf, of
    the fine-tuned model and its GGUF files)."""
    if gguf:
        from tunery.eval.evaluate import evaluate_ggufs

        report = evaluate_ggufs(run, gguf, samples, device, allow_changed_data)
        show_gguf_report(report)
        console.print(f"report: {Path(report['run']) / 'eval' / 'gguf_report.md'}")
        return
    from tunery.eval.evaluate import evaluate_run

    report = evaluate_run(run, samples, device, allow_changed_data)
    show_report(report)
    console.print(f"report: {Path(report['run']) / 'eval' / 'report.md'}")


def show_gguf_report(report: dict) -> None:
    """The torch model and each GGUF file, one column each."""
    table = Table(title=f"held-out: {report['generated']} prompts (torch vs llama.cpp)")
    table.add_column("metric")
    for name in report["rows"]:
        table.add_column(name, justify="right")
    for key, fmt in (("loss", ".4f"), ("perplexity", ".2f"), ("exact_match", ".1%"), ("rouge_l", ".3f"),
                     ("identical_to_torch", ".1%")):
        table.add_row(key, *(format(row[key], fmt) for row in report["rows"].values()))
    console.print(table)


def show_report(report: dict) -> None:
    table = Table(title=f"held-out: {report['generated']} prompts")
    for col in ("metric", "base", "fine-tuned"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key, fmt in (("loss", ".4f"), ("perplexity", ".2f"), ("exact_match", ".1%"), ("rouge_l", ".3f")):
        table.add_row(key, format(report["base"][key], fmt), format(report["fine_tuned"][key], fmt))
    console.print(table)
    for ex in report["examples"][:3]:
        console.print(f"[dim]prompt:[/] {ex['prompt'][:120]}\n  reference: {ex['reference'][:80]}\n"
                      f"  base: {ex['base'][:80]!r}\n  fine-tuned: {ex['fine_tuned'][:80]!r}", highlight=False)
