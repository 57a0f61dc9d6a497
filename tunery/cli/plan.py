"""`tunery plan --data FILE`: which model, method, batch, max_seq_len, epochs and flavor, what it costs, and the
command that does it (tunery/advisor/plan.py holds the rules)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunery.progress import report as out


def plan_command(
    data: Path = typer.Option(..., "--data", help="Training data file (any format `tunery train` reads)."),
    model: list[str] = typer.Option([], "--model", help="Plan for this model (repeat for several); default: "
                                                        "candidates from the catalogue (`tunery models`)."),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU to plan for: T4, L4, A10G, A100, H100 (its cheapest "
                                                       "one-GPU flavor)."),
    flavor: str | None = typer.Option(None, "--flavor", help="Flavor to plan for (tunery/jobs/flavors.yaml); "
                                                             "default: this machine's GPU, else the cheapest "
                                                             "one-GPU flavor that fits each model."),
    budget: str | None = typer.Option(None, "--budget", help="Leave out candidates estimated above this, e.g. 5usd."),
    commercial: bool = typer.Option(False, "--commercial", help="Only models whose licence allows commercial use."),
    method: str | None = typer.Option(None, "--method", help="lora, qlora or full (default: chosen per GPU)."),
    sheet: str | None = typer.Option(None, "--sheet", help="Excel sheet to read."),
    columns: list[str] = typer.Option([], "--columns", help="FIELD=COLUMN mappings, as `tunery train` takes them."),
    write: Path | None = typer.Option(None, "--write", help="Write each candidate's run config here "
                                                            "(<model>.yaml), for `tunery submit --config`."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Recommend how to fine-tune on this data: base or instruct, 2-3 candidate models that fit the GPU and the
    licence filter, method and batch that fit its memory, max_seq_len and epochs, time and dollars, and the
    `tunery train` / `tunery submit` commands."""
    from tunery.advisor.plan import PLANS_DIR, make_plan, write_configs
    from tunery.config import ConfigError, column_pairs
    from tunery.jobs.flavors import parse_money

    if method is not None and method not in ("lora", "qlora", "full"):
        raise ConfigError(f"method must be one of lora, qlora, full, not {method!r}")
    column_pairs(columns)
    plan = make_plan(str(data), list(model), flavor, gpu, parse_money(budget) if budget else None, commercial,
                     method, sheet, list(columns))
    written = write_configs(plan, str(write)) if write else []
    if write:
        for c in plan.candidates:
            c.submit = c.submit.replace(f"{PLANS_DIR}/", f"{write}/", 1)
    if as_json:
        out.print_json(json.dumps({**plan.to_dict(), "written": written}))
        return
    for line in plan.describe():
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if written:
        out.print(f"wrote {', '.join(written)}", highlight=False)
    elif plan.candidates:
        out.print(f"(`--write {PLANS_DIR}` writes the configs the job lines read)", highlight=False)
