"""`tunery data inspect FILE`: format, sizes, problems and a rendered preview before any training."""

from __future__ import annotations

import enum
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from tunery.progress import report as console


class TrainOn(str, enum.Enum):
    assistant = "assistant"
    all = "all"


app = typer.Typer(no_args_is_help=True, help="Look at training data before training on it.")


@app.command("inspect")
def inspect_command(
    file: Path = typer.Argument(..., help="Data file or saved datasets folder."),
    model: str | None = typer.Option(None, "--model", help="Tokenizer to count tokens and render with."),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", help="Rows longer than this are reported."),
    train_on: TrainOn = typer.Option(TrainOn.assistant, "--train-on", help="Which tokens carry loss."),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Held-out file to check overlap with."),
    sheet: str | None = typer.Option(None, "--sheet", help="Excel sheet to read (when a workbook has several)."),
    json_values: bool = typer.Option(False, "--json-values", help="Cells that are not text (numbers, true/false, "
                                     "lists, objects) count as their JSON text instead of rejecting the row."),
    columns: str | None = typer.Option(None, "--columns", help="Your column names for tunery's fields: "
                                       "prompt=Question,completion=Response,reasoning=Complex_CoT"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Report rows, format, token lengths, duplicates, truncation and train/eval overlap.

    Exits with status 1 when training on FILE would fail or train on nothing.
    """
    import json

    from tunery.data.inspect import inspect_file
    from tunery.models.load import embedding_rows

    tokenizer = None
    if model:
        from tunery.data.templates import ensure_chat_template
        from tunery.models.load import load_tokenizer

        tokenizer = load_tokenizer(model)
        ensure_chat_template(tokenizer)
    insp = inspect_file(str(file), tokenizer, max_seq_len, train_on.value, str(eval_data) if eval_data else None,
                        sheet=sheet, json_values=json_values,
                        columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None,
                        embedding_rows=embedding_rows(model) if model else None)
    if as_json:
        print(json.dumps(insp.to_dict(), indent=2))
    else:
        _show(insp)
    if insp.problems:
        raise typer.Exit(1)


def _show(insp) -> None:
    from tunery.data.inspect import histogram

    table = Table(title=f"{insp.path}", show_header=False)
    table.add_row("format", insp.format)
    table.add_row("rows", str(insp.rows))
    table.add_row("rejected", ", ".join(f"{r}: rows {_rows(n)}" for r, n in insp.rejected.items()) or "0")
    table.add_row("exact duplicates", str(insp.duplicates))
    table.add_row("rows over max_seq_len", str(insp.too_long))
    table.add_row("train/eval overlap", f"{insp.overlap} ({insp.overlap_against})")
    if insp.added_tokens:
        table.add_row("added tokens used", ", ".join(f"{t} ({n} rows)" for t, n in insp.added_tokens.items()))
    console.print(table)
    if insp.lengths:
        console.print(f"[bold]length in {insp.length_unit}[/] (min {min(insp.lengths)}, "
                      f"max {max(insp.lengths)}, mean {sum(insp.lengths) / len(insp.lengths):.0f})")
        hist = histogram(insp.lengths)
        peak = max(c for _, _, c in hist)
        for low, high, count in hist:
            console.print(f"  {low:>7}-{high:<7} {'█' * max(1 if count else 0, round(30 * count / peak)):<30} {count}")
    if insp.preview:
        console.print("[bold]first example as the model sees it[/] (⟦trained tokens⟧, also in [green]green[/]):")
        text = Text()
        for piece, trained in insp.preview:  # the brackets survive a pipe or a file; the colour does not
            text.append(f"⟦{piece}⟧" if trained else piece, style="bold green" if trained else "dim")
        console.print(text)
    elif insp.length_unit == "characters":
        console.print("[dim]pass --model to count tokens and preview the rendered template[/]")
    for w in insp.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    for p in insp.problems:
        console.print(f"[bold red]problem:[/] {p}")
    if not insp.problems:
        console.print("[green]ok to train[/]")


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:5]))
    return shown + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
