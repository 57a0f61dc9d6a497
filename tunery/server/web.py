"""What every page of the console shares: its settings, the templates and their formatting filters."""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from tunery.errors import TuneryError
from tunery.jobs import control
from tunery.jobs.flavors import money
from tunery.jobs.store import JobStore
from tunery.server.forms import shown
from tunery.server.listing import run_keys

PACKAGE = files("tunery.server")


class NotFound(TuneryError):
    """A job, run or file the console does not know (404)."""


@dataclass
class Settings:
    """How `tunery ui` was started: TUNERY_HOME, the access token (None: none needed), the upload limit in
    bytes, the folder new runs go in, and the folders whose model folders the model picker lists."""

    home: Path
    token: str | None
    upload_limit: int
    runs_dir: Path
    model_dirs: tuple[Path, ...] = ()
    started: float = field(default_factory=time.time)

    @property
    def uploads(self) -> Path:
        return self.home / "uploads"


def settings(request: Request) -> Settings:
    return request.app.state.settings


def stopping(request: Request) -> bool:
    """Whether the server running the console was told to stop (live streams end then; their pages reconnect)."""
    server = getattr(request.app.state, "server", None)
    return bool(server and server.should_exit)


def job_store(request: Request) -> JobStore:
    """The console's job store, reconciled as every CLI command that reads it reconciles it. Opened (and its file
    checked) once, and again when the file is replaced, not on every request: the check reads the whole file."""
    path = settings(request).home / "jobs.sqlite"
    cached = getattr(request.app.state, "store", None)
    if cached is None or cached[0] != _identity(path):
        opened = JobStore(path)
        request.app.state.store = cached = (_identity(path), opened)
    return control.settle(cached[1])


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def params(billions: float) -> str:
    """A parameter count as people say it: 7.6B, 494M, 130K."""
    for scale, unit in ((1, "B"), (1e-3, "M"), (1e-6, "K")):
        if billions >= scale:
            return f"{billions / scale:.3g}{unit}"
    return f"{billions * 1e9:.0f}"


def spark(values: list[float], width: int = 90, height: int = 20) -> Markup:
    """A loss sparkline as inline SVG (no script: a page of 500 jobs draws 500 of them)."""
    if len(values) < 2:
        return Markup("")
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 1 - (v - low) / span * (height - 2):.1f}"
                      for i, v in enumerate(values))
    return Markup(f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
                  f'aria-label="loss from {values[0]:.3f} to {values[-1]:.3f}"><polyline points="{points}"/></svg>')


def as_json(value: Any) -> Markup:
    """JSON for a <script type="application/json"> block: `</` cannot close the block early."""
    return Markup(json.dumps(value, default=str).replace("</", "<\\/"))


TEMPLATES = Jinja2Templates(directory=str(PACKAGE / "templates"))
TEMPLATES.env.filters.update(duration=duration, money=money, when=when, number=number, spark=spark,
                             as_json=as_json, params=params, shown=shown)


def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """Render a template; htmx requests get the same template (pages keep partials in their own files)."""
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status)


def find_run(request: Request, key: str) -> Path:
    """The run folder named `key` in the console's URLs (tunery/server/listing.py names them)."""
    keys = run_keys(job_store(request).list(limit=100_000), settings(request).runs_dir)
    found = next((path for path, k in keys.items() if k == key), None)
    if found is None or not (found / "config.yaml").is_file():
        raise NotFound(f"no run {key!r} here; runs are listed on the runs and jobs page")
    return found
