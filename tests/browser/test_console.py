"""The web console end to end in headless Chromium: upload, report, model, settings, start, live loss, a closed and
reopened page, eval, chat, GGUF + Modelfile export; CLI jobs in the page and cancel from it; the token, upload
names, sizes and damaged files.

    pytest -m browser tests/browser -q        (needs Debian's chromium: make tools)
    TUNERY_SCREENSHOT_DIR=docs pytest -m browser tests/browser -k flow    (the README's screenshots)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import expect

from .conftest import start_console, stop_console, xlsx_bytes

pytestmark = pytest.mark.browser

STEPS = 40


def _points(page) -> int:
    return int(page.locator("#loss-chart").get_attribute("data-points") or 0)


def _step(page) -> int:
    return int(page.locator("#job-steps").inner_text().split("/")[0])


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("TUNERY_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=False)


def test_upload_train_watch_evaluate_chat_and_export(page, console, tmp_path):
    base = console["url"]
    page.goto(f"{base}/new")
    # 1. data: an .xlsx of Alpaca rows, reported at once
    page.set_input_files("#file", files=[{"name": "reviews.xlsx", "buffer": xlsx_bytes(console["rows"]),
                                          "mimeType": "application/vnd.openxmlformats-officedocument.spreadsheetml"
                                                      ".sheet"}])
    expect(page.locator("#data-rows")).to_have_text(str(len(console["rows"])))
    expect(page.locator("#data-format")).to_have_text("alpaca")
    # 2. model: the tiny one from the models folder; the report now renders rows with their trained tokens
    page.select_option("#model", str(console["model"]))
    expect(page.locator(".preview mark").first).to_be_visible()
    # 3. settings, common and advanced
    for name, value in {"max_steps": str(STEPS), "lr": "5e-3", "batch_size": "8", "max_seq_len": "64",
                        "name": "browser-flow"}.items():
        page.fill(f"#f-{name}", value)
    page.click("text=Advanced settings")
    for name, value in {"eval_samples": "16", "max_new_tokens": "6", "eval_every": "10",
                        "warmup_ratio": "0.05"}.items():
        page.fill(f"#f-{name}", value)
    page.select_option("#f-scheduler", "linear")
    expect(page.locator("#estimate-text")).to_contain_text("Estimate:", timeout=60_000)
    page.click("#start")
    page.wait_for_url(f"{base}/jobs/*", timeout=60_000)
    job_url = page.url

    # the loss chart gains points while the job runs
    _wait(lambda: _points(page) > 0, 120, "the first loss points")
    first = _points(page)
    _wait(lambda: _points(page) > first, 60, "more loss points")
    # closing the page mid-training does not stop the job; reopened, it is further along
    step = _step(page)
    page.close()
    time.sleep(4)
    page = page.context.new_page()
    page.goto(job_url)
    assert _step(page) > step or page.locator("#job-state").inner_text() == "succeeded"
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=180_000)
    _wait(lambda: page.locator("#loss-chart").get_attribute("data-ended") == "1", 30, "the stream to end")
    assert _points(page) == STEPS
    _screenshot(page, "console-job.png", tmp_path)

    # the run: eval table with the fine-tuned exact match above the base
    page.click("text=Open run")
    page.click("#run-eval")
    table = page.locator("#eval-table")
    expect(table).to_be_visible(timeout=180_000)
    em = page.locator('#eval-table tr[data-metric="exact_match"]')
    assert float(em.get_attribute("data-fine-tuned")) > float(em.get_attribute("data-base"))

    # chat with both, side by side
    page.fill("#prompt", "Is this review positive or negative?\n\nThe film was really great.")
    page.click("#chat-send")
    expect(page.locator('.chat-answer[data-model="fine-tuned"]')).to_have_text("positive", timeout=60_000)
    expect(page.locator('.chat-answer[data-model="base"]')).to_be_visible()
    expect(page.locator("#chat-base h3")).to_contain_text("Base model")
    page.locator("#eval-panel").evaluate("panel => panel.scrollIntoView()")
    _screenshot(page, "console-run.png", tmp_path)

    # export a q8_0 GGUF with its Modelfile, and download the Modelfile
    page.select_option("#quant", "q8_0")
    page.click("#export-gguf")
    expect(page.locator("#export-done")).to_be_visible(timeout=240_000)
    with page.expect_download() as download:
        page.click('a[data-file="Modelfile"]')
    modelfile = Path(download.value.path()).read_text()
    assert "FROM ./browser-flow-q8_0.gguf" in modelfile and "TEMPLATE" in modelfile
    expect(page.locator('a[data-file="browser-flow-q8_0.gguf"]')).to_be_visible()


def test_a_cli_job_appears_in_the_page_and_cancel_there_stops_it(page, console):
    home, root = console["home"], console["root"]
    data = root / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in console["rows"]))
    config = root / "long.yaml"
    config.write_text(yaml.safe_dump({"model": str(console["model"]), "data": str(data), "max_steps": 100_000,
                                      "batch_size": 8, "max_seq_len": 64, "output_dir": str(root / "cli-runs")}))
    env = {**os.environ, "TUNERY_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    submitted = subprocess.run([sys.executable, "-m", "tunery.cli.app", "submit", "--config", str(config), "--name",
                                "from-the-cli"], env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    page.goto(console["url"] + "/")
    row = page.locator(f'tr:has(a[href="/jobs/{job_id}"])')
    expect(row).to_contain_text("from-the-cli")
    row.locator(f'a[href="/jobs/{job_id}"]').click()
    _wait(lambda: _step(page) > 0, 120, "the CLI job to train")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("button:has-text('Cancel')")
    expect(page.locator("#job-state")).to_have_text("cancelled", timeout=30_000)
    listing = subprocess.run([sys.executable, "-m", "tunery.cli.app", "jobs"], env={**env, "COLUMNS": "300"},
                             capture_output=True, text=True, timeout=60).stdout
    assert job_id in listing and "cancelled" in listing


def test_a_console_bound_beyond_loopback_needs_its_token(browser, tmp_path):
    home = tmp_path / "home"
    proc, url = start_console(home, "--host", "0.0.0.0")
    try:
        assert "?token=" in url  # generated and printed with the URL
        port = url.split(":")[2].split("/")[0]
        context = browser.new_context()
        page = context.new_page()
        for path in ("/", "/new", "/api/jobs", "/static/app.js"):
            assert page.goto(f"http://127.0.0.1:{port}{path}").status == 401, path
        assert page.request.get(f"http://127.0.0.1:{port}/api/jobs").status == 401
        opened = page.goto(url.replace("0.0.0.0", "127.0.0.1"))
        assert opened.status == 200 and page.url.endswith(f":{port}/")  # the token left the address bar
        expect(page.locator("h1")).to_have_text("Runs and jobs")
        assert page.goto(f"http://127.0.0.1:{port}/new").status == 200  # the cookie carries it
        context.close()
    finally:
        stop_console(proc, home)


def _upload(page, name: str, body: bytes) -> None:
    page.set_input_files("#file", files=[{"name": name, "mimeType": "application/octet-stream", "buffer": body}])


def test_an_upload_named_dot_dot_lands_inside_the_upload_folder(page, console):
    page.goto(console["url"] + "/new")
    _upload(page, "../../x.jsonl", b'{"prompt": "a", "completion": "b"}\n')
    expect(page.locator("#data-rows")).to_have_text("1")
    stored = Path(page.input_value("#data"))
    uploads = console["home"] / "uploads"
    assert stored.name == "x.jsonl" and stored.parent.parent == uploads and stored.is_file()
    assert not (uploads.parent.parent / "x.jsonl").exists() and not (uploads.parent / "x.jsonl").exists()


def test_an_oversized_upload_gets_413_with_the_limit_in_the_page(page, console):
    page.goto(console["url"] + "/new")
    _upload(page, "big.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 70_000)  # 2.4 MB
    expect(page.locator("#report")).to_contain_text("upload limit of 2.0 MB")
    assert page.locator("#report").get_attribute("data-status") == "413"


def test_a_binary_file_named_jsonl_shows_a_data_error(page, console):
    page.goto(console["url"] + "/new")
    _upload(page, "data.jsonl", bytes(range(256)) * 16)
    expect(page.locator("#data-error")).to_contain_text("cannot be used as training data")
    expect(page.locator("#data-error")).to_contain_text("not UTF-8")
