"""The web console in a real headless Chromium (Debian's `chromium`, driven by Playwright): `tunery ui` runs as a
subprocess on a free port over a TUNERY_HOME in a temporary folder, with a tiny model in its models folder that
learns the review task below in about 40 steps on two CPU cores."""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of

GOOD = ["great", "lovely", "excellent", "wonderful", "superb", "delightful"]
BAD = ["awful", "terrible", "boring", "dreadful", "poor", "horrible"]
THINGS = ["film", "book", "meal", "hotel", "phone", "song", "game", "show"]
ADVERBS = ["really", "very", "quite", "truly", "so"]
UPLOAD_LIMIT = "2MB"


def review_rows(n: int = 160) -> list[dict]:
    """Alpaca rows: is a short review positive or negative? All different, half each."""
    combos = [(t, a, w, good) for good in (True, False) for t in THINGS for a in ADVERBS
              for w in (GOOD if good else BAD)]
    random.Random(0).shuffle(combos)
    return [{"instruction": "Is this review positive or negative?", "input": f"The {t} was {a} {w}.",
             "output": "positive" if good else "negative"} for t, a, w, good in combos[:n]]


def xlsx_bytes(rows: list[dict]) -> bytes:
    import pandas as pd

    out = io.BytesIO()
    pd.DataFrame(rows).to_excel(out, index=False)
    return out.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_console(home: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`tunery ui ARGS` on a free port; (process, the URL it printed)."""
    port = _free_port()
    env = {**os.environ, "TUNERY_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    log = open(home.parent / f"console-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tunery.cli.app", "ui", "--port", str(port), *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        text = Path(log.name).read_text()
        match = re.search(r"(http://\S+)", text)
        if match and _answers(f"http://127.0.0.1:{port}/static/app.css"):
            return proc, match[1]
        if proc.poll() is not None:
            raise AssertionError(f"tunery ui exited ({proc.returncode}):\n{text}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"tunery ui did not answer within 60 s:\n{Path(log.name).read_text()}")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # it answered (401 where a token is needed)
    except OSError:
        return False
    return True


def stop_console(proc: subprocess.Popen, home: Path) -> None:
    """Stop the console and any worker it started (its jobs are queued again, as on any worker's SIGTERM)."""
    proc.terminate()
    proc.wait(timeout=30)
    if (home / "jobs.sqlite").exists():
        from tunery.jobs.store import JobStore

        for worker in JobStore(home / "jobs.sqlite").workers():
            try:
                os.kill(worker["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # two CPU cores tokenize, train and render at once
    chromium = shutil.which("chromium")
    if chromium is None:
        raise AssertionError("the browser tests need Debian's chromium: `make tools` (apt-get install chromium)")
    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture(scope="session")
def console(tmp_path_factory) -> dict:
    """A console over a fresh TUNERY_HOME holding the tiny model in its models folder."""
    root = tmp_path_factory.mktemp("console")
    home = root / "home"
    rows = review_rows()
    model = build_tiny_model(home / "models" / "tiny-reviews", corpus_of(rows),
                             TinySpec(hidden_size=64, intermediate_size=192, num_layers=2, vocab_size=300))
    proc, url = start_console(home, "--upload-limit", UPLOAD_LIMIT)
    yield {"url": url.rstrip("/"), "home": home, "root": root, "model": model, "rows": rows}
    stop_console(proc, home)


@pytest.fixture
def page(browser, console):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()
