"""Hub push: the plan and model card built from a run folder, the upload through a stand-in HfApi, offline and
unreachable-Hub failures, and a token that appears nowhere but in the HfApi call.

    .venv/bin/python -m pytest tests/export/test_hub.py -q
"""

from __future__ import annotations

import json
import logging
import shlex
import socket
import time
from pathlib import Path

import pytest
import yaml

from tunery.config import RunConfig
from tunery.errors import ExportError
from tunery.export.hub import format_plan, model_card, plan_upload, push, train_command
from tunery.kernels.options import FastPathOptions

TOKEN = "hf_PlantedSecretToken0123456789abcdef"
DATA_HASH = "5f" * 32


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A finished run folder as `tunery train` + `tunery eval` leave it, with small stand-in weights."""
    data = tmp_path / "dates.jsonl"
    data.write_text('{"prompt": "June 3, 1985", "completion": "1985-06-03"}\n')
    cfg = RunConfig(model="Qwen/Qwen2.5-0.5B-Instruct", data=str(data), name="dates", output_dir=str(tmp_path),
                    lora_r=8, lora_targets=["q_proj", "v_proj"], lora_dropout=0.05, max_steps=20, lr=1e-4,
                    gradient_checkpointing=True, fast_path=FastPathOptions(liger_ops=True, capture_after=3),
                    system_prompt="Answer with a date only.", train_on="all")
    folder = tmp_path / "dates"
    (folder / "adapter").mkdir(parents=True)
    cfg.to_yaml(folder / "config.yaml")
    (folder / "manifest.json").write_text(json.dumps({
        "versions": {"tunery": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0", "peft": "0.17.0"},
        "data_sha256": {str(data): DATA_HASH}, "data_report": {"train_examples": 90, "eval_examples": 10}}))
    (folder / "result.json").write_text(json.dumps({"steps": 20, "final_loss": 0.12345, "eval_loss": 0.23456}))
    (folder / "eval").mkdir()
    metrics = {"loss": 1.5, "perplexity": 4.48, "exact_match": 0.1, "rouge_l": 0.3}
    (folder / "eval" / "report.json").write_text(json.dumps({
        "eval_examples": 10, "generated": 10, "base": metrics,
        "fine_tuned": {"loss": 0.25, "perplexity": 1.28, "exact_match": 0.9, "rouge_l": 0.95}}))
    adapter = folder / "adapter"
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 1500)
    (adapter / "tokenizer.json").write_text("{}")
    (adapter / "README.md").write_text("peft's own card")  # replaced by ours
    (adapter / ".cache").mkdir()
    (adapter / ".cache" / "x").write_text("x")
    return folder


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:].split("\n---\n", 1)[0])


def test_model_card(run: Path):
    card = model_card(run, "adapter", "Qwen/Qwen2.5-0.5B-Instruct", repo_id="me/dates")
    meta = front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert meta["license"] == "apache-2.0"  # inherited from the catalog
    assert meta["library_name"] == "peft"
    assert {"tunery", "lora", "peft", "qwen"} <= set(meta["tags"])
    assert f"`dates.jsonl`: `{DATA_HASH}`" in card
    assert "| final training loss | 0.1235 |" in card and "| held-out loss | 0.2346 |" in card
    assert "| exact_match | 0.1000 | 0.9000 |" in card
    assert "LoRA r=8, alpha=32, dropout=0.05, on q_proj, v_proj" in card
    assert "90 training examples, 10 held out." in card
    assert "transformers 5.23.0" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/dates")' in card
    assert "# dates" in card


def test_train_command_reproduces_the_config(run: Path, monkeypatch: pytest.MonkeyPatch):
    """The card's command, parsed by the real `tunery train` flags, gives back the run's config."""
    import typer
    from typer.testing import CliRunner

    from tunery.cli import train as train_cli

    cfg = RunConfig.from_yaml(run / "config.yaml")
    command = train_command(cfg)
    assert command in model_card(run, "adapter", cfg.model)
    args = shlex.split(command)
    assert args[:2] == ["tunery", "train"] and "--no-" not in command
    seen = {}
    monkeypatch.setattr("tunery.train.train", lambda c: seen.setdefault("cfg", c))
    app = typer.Typer()
    app.command("train")(train_cli.train_command())
    app.command("other")(lambda: None)  # two commands, so the first argument names the command
    result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == 0, result.output
    assert seen["cfg"] == cfg


def test_license_of_local_and_unknown_base_models(run: Path, tmp_path: Path):
    local = tmp_path / "base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# base\n")
    meta = front_matter(model_card(run, "merged", str(local)))
    assert meta["license"] == "mit" and "base_model" not in meta and meta["library_name"] == "transformers"
    (local / "README.md").unlink()
    assert front_matter(model_card(run, "merged", str(local)))["license"] == "other"
    assert front_matter(model_card(run, "gguf", "someone/unknown-model"))["license"] == "other"


def test_plan_upload(run: Path, tmp_path: Path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" * 100)
    plan = plan_upload(run, "me/dates", ["adapter", "gguf"], {"": run / "adapter", "gguf/": gguf})
    files = {f["path_in_repo"]: f for f in plan["files"]}
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "gguf/model.gguf",
                          "README.md"}
    assert files["adapter_model.safetensors"]["bytes"] == 1500 and files["gguf/model.gguf"]["bytes"] == 400
    assert files["README.md"]["local"] is None and files["README.md"]["bytes"] == len(plan["card"].encode())
    assert plan["total_bytes"] == sum(f["bytes"] for f in plan["files"])
    assert plan["repo_id"] == "me/dates" and plan["private"] is True and plan["what"] == ["adapter", "gguf"]
    assert {"gguf", "ollama", "lora"} <= set(front_matter(plan["card"])["tags"])
    json.dumps(plan)  # plain data
    text = format_plan(plan)
    assert "https://huggingface.co/me/dates (private" in text and "1.5 KB  adapter_model.safetensors" in text
    assert plan["card"].strip() in text


@pytest.mark.parametrize("repo_id, what, files, match", [
    ("not a repo!", ["adapter"], None, "not a Hub repo id"),
    ("me/x", ["weights"], None, "one or more of adapter, merged, gguf"),
    ("me/x", ["adapter"], {"README.md": "adapter/README.md"}, "generated model card"),
    ("me/x", ["adapter"], {"": "missing"}, "no such file or folder"),
    ("me/x", ["adapter"], {}, "nothing to push"),
])
def test_plan_upload_rejects(run: Path, repo_id, what, files, match):
    files = {"": run / "adapter"} if files is None else {k: run / v for k, v in files.items()}
    with pytest.raises(ExportError, match=match):
        plan_upload(run, repo_id, what, files)


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records calls, or raises `error` from create_repo."""

    calls: list = []
    error: BaseException | None = None

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        if FakeApi.error is not None:
            raise FakeApi.error
        FakeApi.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        FakeApi.calls.append(("create_commit", repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations],
                              kw))


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    FakeApi.calls, FakeApi.error = [], None
    return FakeApi


def test_push_and_the_token_stays_secret(run: Path, fake_api, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    plan = plan_upload(run, "me/dates", ["adapter"], {"": run / "adapter"})
    text = format_plan(plan)
    url = push(plan, TOKEN)
    assert url == "https://huggingface.co/me/dates"
    assert fake_api.calls[0] == ("init", TOKEN)
    _, repo, kw = fake_api.calls[1]
    assert repo == "me/dates" and kw["exist_ok"] is True and kw["private"] is True
    _, _, operations, _ = fake_api.calls[2]
    uploaded = dict(operations)
    assert uploaded["README.md"] == plan["card"].encode()
    assert Path(uploaded["adapter_model.safetensors"]) == (run / "adapter" / "adapter_model.safetensors").resolve()
    out = capsys.readouterr()
    for place in (json.dumps(plan), plan["card"], text, out.out, out.err, caplog.text, url):
        assert TOKEN not in place


def test_push_offline_fails_at_once(run: Path, fake_api, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = plan_upload(run, "me/dates", ["adapter"], {"": run / "adapter"})
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE is set"):
        push(plan, TOKEN)
    assert fake_api.calls == []  # no HfApi was even made


def _http():
    """The HTTP client package huggingface_hub is built on (httpx2 in huggingface_hub 2.x, httpx in 1.x)."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http


def _connect_error() -> BaseException:
    return _http().ConnectError(f"[Errno 111] Connection refused (token {TOKEN})")


@pytest.mark.parametrize("error", [ConnectionError(f"refused {TOKEN}"), _connect_error()], ids=["builtin", "http"])
def test_push_unreachable_hub_is_a_clear_error(run: Path, fake_api, error):
    fake_api.error = error
    plan = plan_upload(run, "me/dates", ["adapter"], {"": run / "adapter"})
    with pytest.raises(ExportError, match="cannot reach the Hugging Face Hub") as err:
        push(plan, TOKEN)
    assert TOKEN not in str(err.value) and "***" in str(err.value)


def test_push_rejected_token_is_a_clear_error(run: Path, fake_api):
    from huggingface_hub.errors import HfHubHTTPError

    http = _http()
    request = http.Request("POST", "https://huggingface.co/api/repos/create")
    fake_api.error = HfHubHTTPError("401 Unauthorized", response=http.Response(401, request=request))
    plan = plan_upload(run, "me/dates", ["adapter"], {"": run / "adapter"})
    with pytest.raises(ExportError, match="refused the token"):
        push(plan, TOKEN)


def test_push_to_a_closed_port_fails_fast(run: Path, monkeypatch: pytest.MonkeyPatch):
    """The real HfApi against a local port nobody listens on (no network): a clear error within seconds."""
    import huggingface_hub.constants

    with socket.socket() as sock:  # a free loopback port, closed again: connecting to it is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    plan = plan_upload(run, "me/dates", ["adapter"], {"": run / "adapter"})
    start = time.monotonic()
    with pytest.raises(ExportError, match="cannot reach the Hugging Face Hub") as err:
        push(plan, TOKEN)
    assert time.monotonic() - start < 10
    assert TOKEN not in str(err.value)
