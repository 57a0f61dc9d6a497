"""The new fine-tune page: the form generated from RunConfig, uploads (kinds, names, size), the data report, the
estimate, and Start, which queues a job in the same store as `tunery submit`."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from tunery.config import RunConfig
from tunery.jobs.store import JobStore
from tunery.server.forms import config_from_form, form_sections

from .conftest import alpaca_rows


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    """Start queues the job; no worker runs it in these tests."""
    monkeypatch.setattr("tunery.jobs.submit.ensure_worker", lambda *a, **k: False)


def test_every_run_config_field_is_in_the_form_and_reads_back():
    sections = form_sections()
    names = {f.name for fields in sections.values() for f in fields}
    for f in RunConfig.field_specs():
        if f.name not in ("model", "data", "fast_path"):
            assert f.name in names, f.name
    assert "fast_path.compile" in names
    form = {f.name: f.shown for fields in sections.values() for f in fields if f.kind != "bool" or f.default}
    cfg = config_from_form(form, "m", "d.jsonl")
    assert cfg == RunConfig(model="m", data="d.jsonl")  # the defaults shown read back as the defaults
    cfg = config_from_form({**form, "lr": "1e-3", "max_steps": "7", "gradient_checkpointing": "on",
                            "fast_path.compile": "False"}, "m", "d")
    assert cfg.lr == 1e-3 and cfg.max_steps == 7 and cfg.gradient_checkpointing and cfg.fast_path.compile is False


def test_a_bad_value_names_its_field(client):
    response = client.post("/new/estimate", data={"model": "m", "data": "d.jsonl", "lr": "fast"})
    assert "lr must be a number" in response.text


def test_the_page_offers_catalogue_and_local_models(client, home, tiny_model):
    import shutil

    shutil.copytree(tiny_model, home / "models" / "my-tiny")
    page = client.get("/new")
    assert page.status_code == 200
    assert "my-tiny" in page.text and "Qwen/Qwen2.5-0.5B-Instruct" in page.text and "apache-2.0" in page.text
    assert 'name="lora_r"' in page.text and 'name="fast_path.cuda_graphs"' in page.text


def _xlsx(rows: list[dict]) -> bytes:
    out = io.BytesIO()
    pd.DataFrame(rows).to_excel(out, index=False)
    return out.getvalue()


def test_an_xlsx_upload_is_stored_and_reported_with_the_model_tokenizer(client, home, tiny_model):
    rows = alpaca_rows(40) + [{"instruction": "Is this review positive or negative?", "input": "x", "output": ""}]
    response = client.post("/new/upload", data={"model": str(tiny_model), "max_seq_len": "64"},
                           files={"file": ("reviews.xlsx", _xlsx(rows))})
    assert response.status_code == 200, response.text
    stored = response.headers["X-Tunery-Data"]
    assert stored.startswith(str(home / "uploads")) and stored.endswith("/reviews.xlsx")
    assert 'id="data-rows">41<' in response.text and "alpaca" in response.text
    assert "41" in response.text and "<mark>" in response.text  # trained tokens highlighted
    assert "Rejected rows" in response.text  # the empty output, by row number


@pytest.mark.parametrize("name", ["../../x.jsonl", "..\\..\\x.jsonl", "/etc/x.jsonl"])
def test_an_upload_name_cannot_leave_the_upload_folder(client, home, name):
    body = json.dumps({"prompt": "a", "completion": "b"}) + "\n"
    response = client.post("/new/upload", files={"file": (name, body.encode())})
    stored = home / "uploads" / response.headers["X-Tunery-Data"].split("/uploads/", 1)[1]
    assert stored.parent.parent == home / "uploads" and stored.name == "x.jsonl" and stored.is_file()
    assert not (home.parent / "x.jsonl").exists()


def test_an_upload_of_another_kind_is_refused(client):
    response = client.post("/new/upload", files={"file": ("run.sh", b"echo hi")}, headers={"HX-Request": "true"})
    assert response.status_code == 400 and "not a data file" in response.text


def test_an_oversized_upload_gets_413_with_the_limit(client):
    response = client.post("/new/upload", files={"file": ("big.jsonl", b"x" * (2**20 + 10))})
    assert response.status_code == 413 and "upload limit of 1.0 MB" in response.text


def test_a_binary_file_named_jsonl_is_a_data_error_not_a_server_error(client):
    response = client.post("/new/upload", files={"file": ("data.jsonl", bytes(range(256)) * 8)})
    assert response.status_code == 422 and "cannot be used as training data" in response.text
    assert "not UTF-8" in response.text


def test_estimate_and_start_queue_a_job_in_the_cli_store(client, home, tiny_model, tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(40)))
    form = {"data": str(data), "model": str(tiny_model), "max_steps": "5", "batch_size": "4", "max_seq_len": "64",
            "name": "from-the-browser", "flavor": "local", "backend": "local"}
    estimate = client.post("/new/estimate", data=form)
    assert "Estimate:" in estimate.text and "on local" in estimate.text
    response = client.post("/new/start", data=form)
    assert response.status_code == 200, response.text
    job_id = response.headers["HX-Redirect"].rsplit("/", 1)[1]
    job = JobStore(home / "jobs.sqlite").get(job_id)
    assert job.state == "queued" and job.name == "from-the-browser"
    saved = RunConfig.from_yaml(home / "runs" / "from-the-browser" / "config.yaml")
    assert saved.max_steps == 5 and saved.data == str(data) and saved.model == str(tiny_model)
    again = client.post("/new/start", data=form, headers={"HX-Request": "true"})
    assert again.status_code == 400 and "already exists" in again.text


def test_start_refuses_past_the_budget_unless_told(client, home, tiny_model, tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(40)))
    form = {"data": str(data), "model": str(tiny_model), "epochs": "1000", "max_seq_len": "64",
            "flavor": "cpu-upgrade", "backend": "local", "budget": "0.00001usd"}
    refused = client.post("/new/start", data=form, headers={"HX-Request": "true"})
    assert refused.status_code == 400 and "exceeds the budget" in refused.text
    assert JobStore(home / "jobs.sqlite").list() == []
    started = client.post("/new/start", data={**form, "over_budget": "on"})
    assert started.status_code == 200 and len(JobStore(home / "jobs.sqlite").list()) == 1


def test_the_form_shows_itself_as_yaml_and_the_submit_command(client, tiny_model):
    response = client.post("/new/yaml", data={"model": str(tiny_model), "data": "/d/train.jsonl", "lr": "1e-3",
                                              "flavor": "local", "backend": "local", "timeout": "30m"})
    assert response.status_code == 200
    assert "lr: 0.001" in response.text and "data: /d/train.jsonl" in response.text
    assert "tunery submit --config run.yaml --timeout 30m" in response.text
    assert "lora_r" not in response.text  # only what differs from the defaults


def test_fine_tune_again_fills_the_form_from_a_run(client, home):
    run = home / "runs" / "earlier"
    run.mkdir(parents=True)
    RunConfig(model="Qwen/Qwen2.5-0.5B", data="/d/train.jsonl", name="earlier", lr=5e-4, lora_r=8,
              gradient_checkpointing=True).to_yaml(run / "config.yaml")
    page = client.get("/new?from=earlier")
    assert page.status_code == 200 and "Settings, data and model from" in page.text
    assert 'value="/d/train.jsonl"' in page.text and 'value="0.0005"' in page.text and 'value="8"' in page.text
    assert '<option value="Qwen/Qwen2.5-0.5B" selected>' in page.text
    assert 'name="gradient_checkpointing" class="" checked' in page.text
