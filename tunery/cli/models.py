"""`tunery models [MODEL]`: every model tunery knows, as data, or one model described (a catalogue id, a local
folder or a Hub-cached model: its config.json)."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from tunery.progress import report as out


def models_command(
    model: str | None = typer.Argument(None, help="Describe this model: a catalogue id, a local folder, or a Hub id "
                                                  "whose config.json is in the Hub cache."),
    commercial: bool = typer.Option(False, "--commercial", help="Only models whose licence allows commercial use."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The model catalogue: family, size, base or instruct (and its pair), licence, context, chat template, and
    what tunery supports for each (fast path, packing, GGUF export, QLoRA)."""
    from tunery.advisor.models import catalogue, describe

    rows = [describe(model)] if model else catalogue(commercial)
    if as_json:
        out.print_json(json.dumps([r.to_dict() for r in rows]))
        return
    table = Table(title="tunery models" if not model else None)
    for col in ("model", "family", "params", "kind", "pair", "licence", "commercial", "context", "template",
                "supports"):
        table.add_column(col, overflow="fold", no_wrap=col in ("model", "pair"))
    for r in rows:
        support = ", ".join(k for k, v in r.supports.items() if v)
        if r.prequantized:
            support += "; 4-bit checkpoint: --method qlora only"
        table.add_row(r.model, r.family or "unknown (reference path)", f"{r.params_b:g}B", r.kind,
                      r.pair.rsplit("/", 1)[-1] if r.pair else "-", r.licence or "?", _commercial(r.commercial),
                      f"{r.context:,}" if r.context else "?", r.template or "-", support)
    out.print(table)
    if model and rows[0].source != "catalogue":
        out.print(f"read from {rows[0].source}; licence: {rows[0].licence_terms}")


def _commercial(value: bool | None) -> str:
    return {True: "yes", False: "limited", None: "unknown"}[value]
