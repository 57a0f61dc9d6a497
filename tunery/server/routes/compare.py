"""Compare: several runs ranked by one metric (the leaderboard `tunery compare` prints: advisor/leaderboard.py),
their sample answers side by side, their metrics in one table, the settings where they differ, and their loss
curves overlaid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from tunery.advisor.leaderboard import HEADER, METRICS, leaderboard, table_rows
from tunery.config import RunConfig
from tunery.errors import TuneryError
from tunery.run import open_run
from tunery.server.listing import entries, metrics_of, read_json
from tunery.server.web import job_store, page, settings

router = APIRouter()


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request, run: list[str] = Query(default=[]),
                 metric: str = Query(default="exact_match")) -> HTMLResponse:
    listed = [e for e in entries(job_store(request), settings(request).runs_dir) if e.run_dir.is_dir()]
    chosen = [e for e in listed if e.key in run]
    rows = [_row(e.key, e.run_dir) for e in chosen]
    rows = [r for r in rows if r is not None]
    metric = metric if metric in METRICS else "exact_match"
    board = leaderboard([r["run_dir"] for r in rows], metric) if rows else None
    return page(request, "compare.html", listed=listed, selected=set(run), rows=rows, differing=_differing(rows),
                curves=[{"name": r["key"], "metrics": r["metrics"]} for r in rows], board=board,
                board_rows=table_rows(board) if board else [], board_header=HEADER, metrics=METRICS, metric=metric)


def _row(key: str, run: Path) -> dict | None:
    try:
        _, cfg = open_run(run)
    except TuneryError:
        return None
    result, report = read_json(run / "result.json"), read_json(run / "eval" / "report.json")
    metrics = [{k: m.get(k) for k in ("step", "loss", "eval_loss")} for m in metrics_of(run)]
    return {"key": key, "run_dir": run, "cfg": cfg, "result": result, "base": report.get("base", {}),
            "tuned": report.get("fine_tuned", {}), "metrics": metrics,
            "steps": result.get("steps") or (metrics[-1]["step"] if metrics else None)}


def _differing(rows: list[dict]) -> list[tuple[str, list]]:
    """(setting, value per run) for the settings whose values are not all the same."""
    out = []
    for f in dataclasses.fields(RunConfig):
        values = [getattr(r["cfg"], f.name) for r in rows]
        if f.name == "fast_path":
            values = [v.changed() for v in values]
        if len(rows) > 1 and any(v != values[0] for v in values):
            out.append((f.name, values))
    return out
