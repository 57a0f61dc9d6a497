"""One run's page: settings, loss, chat with both models, eval as a background task, downloads that stay inside
the run folder, the Hub dry-run preview."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import time
import zipfile

import pytest

from tunery.server.app import create_app


@pytest.fixture
def run_client(home, trained_run):
    from fastapi.testclient import TestClient

    runs = home / "runs"
    runs.mkdir(parents=True)
    shutil.copytree(trained_run, runs / trained_run.name)
    return TestClient(create_app(home), base_url="http://127.0.0.1:7860")


def test_the_run_page_shows_settings_manifest_and_loss(run_client):
    page = run_client.get("/runs/tiny-run")
    assert page.status_code == 200
    assert "config.yaml" in page.text and "manifest.json" in page.text and '"versions"' in page.text
    assert 'id="run-metrics"' in page.text and "Evaluate" in page.text
    assert run_client.get("/runs/nope").status_code == 404


def test_chat_answers_with_both_models_side_by_side(run_client):
    response = run_client.post("/runs/tiny-run/chat", data={"prompt": "Is this review positive or negative?",
                                                             "max_new_tokens": "4"})
    assert response.status_code == 200
    assert 'data-model="base"' in response.text and 'data-model="fine-tuned"' in response.text
    assert "adapter off" in response.text
    history = html.unescape(re.search(r'id="chat-history" name="history" value="([^"]*)"', response.text)[1])
    assert [t["user"] for t in json.loads(history)] == ["Is this review positive or negative?"]
    second = run_client.post("/runs/tiny-run/chat", data={"prompt": "And this one?", "history": history,
                                                           "max_new_tokens": "4"})
    assert second.text.count('class="chat-user"') == 4  # two turns, in each column
    empty = run_client.post("/runs/tiny-run/chat", data={"prompt": " "}, headers={"HX-Request": "true"})
    assert empty.status_code == 400 and "type a message" in empty.text


def test_eval_runs_in_the_background_and_its_report_replaces_the_log(run_client):
    started = run_client.post("/runs/tiny-run/eval", data={"samples": "4"})
    assert started.status_code == 200 and "Evaluating" in started.text and "every 1s" in started.text
    again = run_client.post("/runs/tiny-run/eval", headers={"HX-Request": "true"})
    assert again.status_code == 400 and "still running" in again.text
    deadline = time.time() + 240
    while "Evaluating" in (section := run_client.get("/runs/tiny-run/eval").text) and time.time() < deadline:
        time.sleep(1)
    assert 'id="eval-table"' in section and 'data-metric="exact_match"' in section, section


def test_downloads_zip_the_adapter_and_stay_inside_the_run(run_client):
    response = run_client.get("/runs/tiny-run/zip/adapter")
    assert response.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    assert run_client.get("/runs/tiny-run/files/config.yaml").status_code == 200
    for escape in ("../../jobs.sqlite", "..%2F..%2Fjobs.sqlite", "/etc/passwd"):
        assert run_client.get(f"/runs/tiny-run/files/{escape}").status_code == 404, escape


def test_hub_preview_shows_the_plan_and_card_without_pushing(run_client):
    response = run_client.post("/runs/tiny-run/hub", data={"repo": "me/tiny-reviews", "action": "preview"})
    assert response.status_code == 200
    assert "would push to https://huggingface.co/me/tiny-reviews" in response.text
    assert "README.md" in response.text and "tunery train" in response.text


def test_compare_puts_runs_metrics_in_one_table_with_their_differences(run_client, home, trained_run):
    import yaml

    other = home / "runs" / "tiny-run-2"
    shutil.copytree(trained_run, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**cfg, "name": "tiny-run-2", "lr": 0.001}))
    page = run_client.get("/compare?run=tiny-run&run=tiny-run-2")
    assert page.status_code == 200
    assert 'data-run="tiny-run"' in page.text and 'data-run="tiny-run-2"' in page.text
    assert "<td>lr</td>" in page.text and "<td>name</td>" in page.text  # the settings that differ
    assert 'id="compare-curves"' in page.text
    assert "Pick two or more" in run_client.get("/compare").text
