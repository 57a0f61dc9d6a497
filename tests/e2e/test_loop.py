"""The whole loop through the real CLI on a tiny model: train -> eval -> export -> chat."""

from __future__ import annotations

import json

import pytest

from .conftest import metrics, run_cli, train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(workspace) -> dict:
    run_cli(*train_args(workspace, "loop", "--max-steps", "80", "--save-every", "40"), home=workspace["home"])
    return {**workspace, "run": workspace["root"] / "runs" / "loop"}


def test_run_folder_is_complete_and_loss_falls(trained):
    run = trained["run"]
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "train.log", "result.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (run / name).exists(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["versions"]["torch"] and manifest["model"]["folder_sha256"]
    assert list(manifest["data_sha256"].values())[0] == __import__("hashlib").sha256(
        trained["data"].read_bytes()).hexdigest()
    result = json.loads((run / "result.json").read_text())
    engine, timing = result["engine"], result["timing"]
    assert engine["fast_path"].startswith("reference path") and engine["steps"] == "no CUDA graphs (CPU)"
    assert 0 < timing["first_step_s"] and 0 < timing["loop_s"] and timing["tokens"] > 0
    assert timing["tokens_per_s"] > 0 and timing["steady_tokens_per_s"] > 0 and 0 <= timing["padding_share"] < 1
    assert set(timing["setup"]) == {"imports_s", "data_s", "load_s", "prepare_s"} and timing["save_s"] >= 0
    assert sum(timing["setup"].values()) < timing["first_step_s"]  # the setup phases come before the first step
    assert "peak_gib" not in timing and timing["cuda_graphs"] == 0  # a CPU run: no GPU peak, no graphs
    assert all(m["tokens_per_s_recent"] > 0 and m["elapsed_s"] > 0 for m in metrics(run))
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 80
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.7 * first, f"loss fell only from {first:.3f} to {last:.3f}"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000040"]


def test_eval_shows_fine_tuned_beating_base(trained):
    proc = run_cli("eval", str(trained["run"]), home=trained["home"])
    assert "fine-tuned" in proc.stdout + proc.stderr
    report = json.loads((trained["run"] / "eval" / "report.json").read_text())
    assert report["generated"] == 20
    assert report["fine_tuned"]["loss"] < report["base"]["loss"]
    assert report["fine_tuned"]["rouge_l"] > report["base"]["rouge_l"]
    assert (trained["run"] / "eval" / "report.md").read_text().count("\n|") >= 6


def test_merged_export_reproduces_adapter_greedy_output(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.run import load_trained

    out = tmp_path / "merged"
    run_cli("export", str(trained["run"]), "--merged", str(out), home=trained["home"])
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    _, adapter_model, _ = load_trained(trained["run"], "cpu")
    prompts = ["Rewrite this date as YYYY-MM-DD: 4 July 1976", "Rewrite this date as YYYY-MM-DD: Dec 25 1999"]
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            a = adapter_model.generate(**ids, max_new_tokens=12, do_sample=False)
            b = merged.generate(**ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(a, b), (tokenizer.decode(a[0]), tokenizer.decode(b[0]))


def test_chat_answers_with_the_run_template(trained):
    proc = run_cli("chat", str(trained["run"]), "--prompt", "Rewrite this date as YYYY-MM-DD: 4 July 1976",
                   home=trained["home"])
    reply = proc.stdout.strip().splitlines()[-1]
    assert reply and "<|im_end|>" not in reply
    assert any(ch.isdigit() for ch in reply)
    base = run_cli("chat", str(trained["run"]), "--base", "--max-new-tokens", "8", "--prompt",
                   "Rewrite this date as YYYY-MM-DD: 4 July 1976", home=trained["home"])
    assert base.stdout.strip() != proc.stdout.strip()  # the adapter switched off answers differently


def test_data_inspect_reports_format_and_preview(workspace):
    proc = run_cli("data", "inspect", str(workspace["data"]), "--model", str(workspace["model"]), "--json",
                   home=workspace["home"])
    report = json.loads(proc.stdout)
    assert report["format"] == "openai" and report["rows"] == 200 and not report["problems"]


def test_bad_inputs_fail_with_clear_messages(workspace, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n')
    proc = run_cli(*train_args(workspace, "bad", "--max-steps", "2"), "--data", str(bad), home=workspace["home"],
                   check=False)
    assert proc.returncode == 2 and "bad.jsonl: no example left" in proc.stderr and "Traceback" not in proc.stderr
    assert "line 2: malformed JSON" in proc.stderr  # the bad line is named with the rest of the file's problems
    proc = run_cli("train", "--model", "no-such-org/no-such-model", "--data", str(workspace["data"]),
                   "--output-dir", str(tmp_path / "runs"), home=workspace["home"], check=False)
    assert proc.returncode == 2 and "--model DIR" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "hi", "completion": ""}\n')
    proc = run_cli(*train_args(workspace, "empty", "--max-steps", "2"), "--data", str(empty),
                   home=workspace["home"], check=False)
    assert proc.returncode == 2 and "no example left to train on" in proc.stderr
    proc = run_cli("train", "--config", str(tmp_path / "missing.yaml"), home=workspace["home"], check=False)
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr
