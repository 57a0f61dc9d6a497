"""A tokenizer with special tokens the model has no embedding rows for (tool markers added for a fine-tune):
training grows the embeddings and trains the new rows with the adapter; the adapter saves and reloads them; the
merged model and its f16 GGUF give the adapter model's greedy output."""

from __future__ import annotations

import json
import re

import pytest

from tunery.models.tiny import TinySpec, build_tiny_model

pytestmark = pytest.mark.usefixtures("tunery_home")

ADDED = ["<|tool|>", "<|/tool|>"]
QUESTION = "Wrap 31."


@pytest.fixture(scope="module", params=["qwen2", "llama"])  # output layer tied to the embeddings, and not
def run(request, tmp_path_factory):
    from transformers import AutoTokenizer

    from tunery.config import RunConfig
    from tunery.train import train

    root = tmp_path_factory.mktemp("added")
    rows = [{"messages": [{"role": "user", "content": f"Wrap {n}."},
                          {"role": "assistant", "content": f"<|tool|>{n}<|/tool|>"}]} for n in range(10, 90)]
    data = root / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_tiny_model(root / "model", ["Wrap 12.", "user\n", "assistant\n"],
                             TinySpec(family=request.param, hidden_size=64, intermediate_size=128, num_layers=2,
                                      num_heads=2, num_kv_heads=1, vocab_size=300))
    tok = AutoTokenizer.from_pretrained(model)
    rows_before = len(tok)
    assert tok.add_special_tokens({"additional_special_tokens": ADDED}) == 2
    tok.save_pretrained(model)  # the model keeps its rows_before embedding rows: two tokens have none
    run = train(RunConfig(model=str(model), data=str(data), output_dir=str(root / "runs"), name="tools",
                          max_steps=80, batch_size=8, lr=1e-2, max_seq_len=64, eval_samples=0, save_every=0,
                          lora_r=16, lora_alpha=32))
    return run, rows_before


def _greedy(model, tok) -> list[int]:
    import torch

    from tunery.data.templates import render, stop_token_ids

    text = render(tok, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=stop_token_ids(tok),
                             pad_token_id=tok.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_the_new_rows_train_save_and_reload_with_the_adapter(run):
    from safetensors import safe_open

    from tunery.run import load_trained

    run, rows_before = run
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        saved = [k for k in f.keys() if "trainable_tokens" in k]
    assert saved, "the adapter holds no trained token rows"
    base, tuned, tok = load_trained(run, "cpu")
    assert tuned.config.vocab_size == rows_before + 2 == len(tok)
    reply = _greedy(tuned, tok)
    added = tok.convert_tokens_to_ids(ADDED)
    assert reply[:1] == added[:1] and added[1] in reply, tok.decode(reply)  # it learned to use both new tokens
    assert re.match(r"<\|tool\|>\d+<\|/tool\|>", tok.decode(reply, skip_special_tokens=False)), tok.decode(reply)


def test_merged_model_and_f16_gguf_reproduce_the_adapter_model(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.export.gguf import write_gguf
    from tunery.export.merge import export_merged
    from tunery.export.verify import verify_gguf
    from tunery.run import load_trained

    run, rows_before = run
    _, tuned, tok = load_trained(run, "cpu")
    expected = _greedy(tuned, tok)
    merged = export_merged(run, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_input_embeddings().num_embeddings == rows_before + 2
    assert _greedy(model, AutoTokenizer.from_pretrained(merged)) == expected
    gguf = write_gguf(merged, tmp_path / "tools.f16.gguf", "f16", progress=False)
    prompts = [[{"role": "user", "content": QUESTION}], [{"role": "user", "content": "Wrap 57."}]]
    report = verify_gguf(gguf, merged, prompts, quant="f16")
    assert report["examples"][0]["torch"] == report["examples"][0]["gguf"]


def test_the_fast_path_steps_aside_for_trained_token_rows(tmp_path):
    """Its fused loss reads lm_head.weight directly, which would miss the trained rows: the reference path runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.kernels.apply import fast_path_for
    from tunery.kernels.options import FastPathOptions
    from tunery.models.catalog import family_of_model
    from tunery.models.load import grow_vocabulary
    from tunery.models.lora import apply_lora

    folder = build_tiny_model(tmp_path / "m", ["Wrap 12."], TinySpec(hidden_size=32, intermediate_size=64,
                                                                      num_layers=1, num_heads=2, num_kv_heads=1))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ADDED})
    for new_tokens in ([], None):
        model = AutoModelForCausalLM.from_pretrained(folder)
        new_tokens = grow_vocabulary(model, tok) if new_tokens is None else new_tokens
        model = apply_lora(model, 4, 8, 0.0, new_tokens=new_tokens)
        fast = fast_path_for(model, "cpu", family_of_model(model), FastPathOptions(allow_cpu=True))
        assert ("added tokens" in (fast.reason or "")) == bool(new_tokens), fast.reason


def test_inspect_names_the_added_tokens_the_data_uses_and_those_without_a_row(run, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from tunery.cli.app import app

    cfg = yaml.safe_load((run[0] / "config.yaml").read_text())
    result = CliRunner().invoke(app, ["data", "inspect", cfg["data"], "--model", cfg["model"], "--json"])
    report = json.loads(result.stdout[result.stdout.index("{"):])  # after any progress output
    assert report["added_tokens"] == {"<|tool|>": 80, "<|/tool|>": 80}, report["added_tokens"]
    assert report["new_tokens"] == ADDED
    assert any("no embedding row" in w for w in report["warnings"]), report["warnings"]
