"""The web console's app: `create_app(home, token, upload_limit)` builds it; `tunery ui` serves it with uvicorn.

    tunery ui                      # http://127.0.0.1:7860
    python -c "from tunery.server.app import create_app; app = create_app()"   # for uvicorn, or a TestClient

The console is a thin client: its pages call tunery.data (inspect), tunery.jobs (the same store, submit, cancel and
retry as the CLI), tunery.eval and tunery.export, and hold no training logic of their own.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from tunery.errors import TuneryError
from tunery.paths import tunery_home
from tunery.server.chat import ChatModels
from tunery.server.guard import Guard, UploadTooLarge
from tunery.server.routes import compare, jobs, new, runs
from tunery.server.tasks import Tasks
from tunery.server.web import PACKAGE, NotFound, Settings, page

DEFAULT_UPLOAD_LIMIT = 512 * 2**20


def create_app(home: Path | None = None, token: str | None = None, upload_limit: int = DEFAULT_UPLOAD_LIMIT,
               runs_dir: Path | None = None, model_dirs: tuple[Path, ...] = ()) -> FastAPI:
    """The console over TUNERY_HOME `home` (default: the environment's). `token`: required on every request when
    given. `upload_limit`: bytes. `runs_dir`: where new runs go (default HOME/runs). `model_dirs`: folders whose
    model folders the model picker lists, besides HOME/models."""
    home = Path(home or tunery_home()).expanduser().resolve()
    # the job store, the worker it starts, the caches and the uploads all read TUNERY_HOME
    os.environ["TUNERY_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="tunery", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = Settings(home=home, token=token or None, upload_limit=upload_limit,
                                  runs_dir=Path(runs_dir or home / "runs").expanduser().resolve(),
                                  model_dirs=(home / "models", *(Path(d).expanduser().resolve() for d in model_dirs)))
    app.state.tasks, app.state.chat = Tasks(home), ChatModels()
    app.mount("/static", StaticFiles(directory=str(PACKAGE / "static")), name="static")
    for module in (jobs, new, runs, compare):
        app.include_router(module.router)
    app.add_exception_handler(TuneryError, _tunery_error)
    app.add_exception_handler(UploadTooLarge, _too_large)
    app.add_middleware(Guard, token=token or None, upload_limit=upload_limit)
    return app


def _tunery_error(request: Request, error: Exception) -> Response:
    """A user-facing error as the page or fragment that asked: what went wrong and what to do, never a 500."""
    status = 404 if isinstance(error, NotFound) else 400
    if request.url.path.startswith("/api/"):
        return PlainTextResponse(str(error), status_code=status)
    name = "_error.html" if request.headers.get("hx-request") else "error.html"
    return page(request, name, status=status, message=str(error))


def _too_large(request: Request, error: Exception) -> HTMLResponse:
    return HTMLResponse(f'<div class="problem" role="alert">413: {error}</div>', status_code=413)
