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
    prompt_template: str | None = typer.Option(None, "--prompt-template", help="A base model's prompt layout, "
                                               "as in training (e.g. '### Question:\\n{prompt}\\n\\n### "
                                               "Response:\\n{completion}'); needs --model."),
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
        ensure_chat_template(tokenizer, prompt_template)
    elif prompt_template:
        raise typer.BadParameter("--prompt-template renders with a tokenizer: pass --model too")
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
    from rich.markup import escape  # the report quotes the data: a "[yes]" label is text, not markup

    from tunery.data.inspect import rows_text

    table = Table(title=escape(insp.path), show_header=False)
    table.add_row("format", insp.format)
    table.add_row("rows", str(insp.rows))
    table.add_row("rejected", _rejected(insp.rejected))
    table.add_row("exact duplicates", _counted(insp.duplicates, insp.duplicate_rows))
    table.add_row("near duplicates (case, spaces, end punctuation)",
                  _counted(insp.near_duplicates, insp.near_duplicate_rows))
    table.add_row("prompts with different answers", _counted(insp.conflicts, insp.conflicting_rows))
    table.add_row("rows over max_seq_len", str(insp.too_long))
    overlap = f"{insp.overlap} up to case, spaces, end punctuation ({insp.overlap_exact} exact; {insp.overlap_against})"
    table.add_row("train/eval overlap", escape(overlap + (f": rows {rows_text(insp.overlap_rows)}" if insp.overlap
                                                          else "")))
    if insp.labels:
        table.add_row("labels (last answers)", escape(", ".join(f"{label!r}: {n}" for label, n in insp.labels.items())
                                                      + (f", other answers: {insp.labels_other}" if insp.labels_other
                                                         else "")))
    if insp.added_tokens:
        table.add_row("added tokens used", escape(", ".join(f"{t} ({n} rows)" for t, n in insp.added_tokens.items())))
    if insp.eval_rows:
        table.add_row("eval rows", str(insp.eval_rows))
        table.add_row("eval rejected", _rejected(insp.eval_rejected))
        if insp.length_unit == "tokens":
            table.add_row("eval rows over max_seq_len", _counted(len(insp.eval_too_long_rows),
                                                                 [insp.eval_too_long_rows]))
    console.print(table)
    _show_lengths(f"length in {insp.length_unit}", insp.lengths)
    if insp.eval_rows:
        _show_lengths(f"eval file length in {insp.length_unit}", insp.eval_lengths)
    if insp.preview:
        console.print("[bold]first example as the model sees it[/] (⟦trained tokens⟧, also in [green]green[/]):")
        text = Text()
        for piece, trained in insp.preview:  # the brackets survive a pipe or a file; the colour does not
            text.append(f"⟦{piece}⟧" if trained else piece, style="bold green" if trained else "dim")
        console.print(text)
    elif insp.length_unit == "characters":
        console.print("[dim]pass --model to count tokens and preview the rendered template[/]")
    for w in insp.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    for p in insp.problems:
        console.print(f"[bold red]problem:[/] {escape(p)}")
    if not insp.problems:
        console.print("[green]ok to train[/]")


def _rejected(rejected: dict[str, list[int]]) -> str:
    from rich.markup import escape

    from tunery.data.inspect import rows_text

    return escape(", ".join(f"{r}: rows {rows_text(n)}" for r, n in rejected.items()) or "0")


def _counted(n: int, groups: list[list[int]]) -> str:
    """"2 (rows 3, 17; rows 5, 9)": a count and the row groups behind it, capped."""
    from tunery.data.inspect import groups_text

    return f"{n} ({groups_text(groups)})" if n else "0"


def _show_lengths(title: str, lengths: list[int]) -> None:
    from tunery.data.inspect import histogram

    if not lengths:
        return
    console.print(f"[bold]{title}[/] (min {min(lengths)}, max {max(lengths)}, mean {sum(lengths) / len(lengths):.0f})")
    hist = histogram(lengths)
    peak = max(c for _, _, c in hist)
    for low, high, count in hist:
        console.print(f"  {low:>7}-{high:<7} {'█' * max(1 if count else 0, round(30 * count / peak)):<30} {count}")


