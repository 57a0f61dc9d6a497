"""`tunery export RUN --merged OUT`."""

from __future__ import annotations

from pathlib import Path

import typer

from tunery.progress import console


def export_command(
    run: Path = typer.Argument(..., help="Run folder written by `tunery train`."),
    merged: Path | None = typer.Option(None, "--merged", help="Write merged safetensors + tokenizer here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output folder if it exists."),
) -> None:
    """Export a trained run: merged weights that plain transformers loads."""
    from tunery.export.merge import export_merged

    if merged is None:
        raise typer.BadParameter("say what to export: --merged OUT")
    out = export_merged(run, merged, overwrite)
    console.print(f"[green]merged model written to {out}[/] (AutoModelForCausalLM.from_pretrained('{out}'))")
