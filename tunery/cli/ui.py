"""`tunery ui [--host 127.0.0.1] [--port 7860] [--token T]`: the web console (tunery/server)."""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

import typer

from tunery.errors import TuneryError
from tunery.progress import console


def ui_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; any other than loopback needs a "
                             "token (one is made and printed when --token is not given)."),
    port: int = typer.Option(7860, "--port", help="Port to listen on."),
    token: str | None = typer.Option(None, "--token", envvar="TUNERY_UI_TOKEN",
                                     help="Access token every page and API call must carry (env TUNERY_UI_TOKEN)."),
    upload_limit: str = typer.Option("512MB", "--upload-limit", help="Largest data file the browser may upload, "
                                     "e.g. 50MB, 2GB."),
    runs: Path | None = typer.Option(None, "--runs", help="Folder new runs go in and runs are listed from "
                                     "[TUNERY_HOME/runs]."),
    models: list[Path] = typer.Option([], "--models", help="A folder of model folders the model picker lists "
                                      "(repeatable; TUNERY_HOME/models always is)."),
) -> None:
    """Serve the web console: fine-tune, watch, compare and export from a browser."""
    try:
        import uvicorn

        from tunery.server.app import create_app
    except ImportError as e:
        raise TuneryError(f"the web console needs its extra ({e.name} is missing): pip install 'tunery[ui]'") from None
    if not token and not loopback(host):
        token = secrets.token_urlsafe(24)
    app = create_app(token=token, upload_limit=parse_size(upload_limit), runs_dir=runs, model_dirs=tuple(models))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"tunery console on [bold]{url}[/] (TUNERY_HOME {app.state.settings.home}); Ctrl-C stops it, "
                  "not the jobs", highlight=False, soft_wrap=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    app.state.server = server  # the live streams end when it is told to stop: Ctrl-C is not held up by open pages
    server.run()


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_size(text: str) -> int:
    """'512MB' / '2GB' / '100k' / '1048576' -> bytes."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*", text.lower())
    if not match:
        raise TuneryError(f"cannot read --upload-limit {text!r}: use e.g. 50MB or 2GB")
    return int(float(match[1]) * 1024 ** " kmg".index(match[2] or " "))
