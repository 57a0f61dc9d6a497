"""Tiny models for the GGUF export tests: built offline, then trained for a few seconds on the date task.

Random-init tiny models have near-flat logits, so a top-1 comparison would hinge on float noise; a short full
fine-tune makes the next token clear (as in any real fine-tuned model) and teaches the model to end its turn with
<|im_end|>, so the stop-at-end-of-turn checks have something to check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of, train_tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "tunery" / "assets" / "dates.jsonl"
TRAIN_ROWS = 200
TRAIN_STEPS = 150
SPEC = dict(hidden_size=64, intermediate_size=192, num_layers=2, vocab_size=400)

# families and settings tiny.py does not build: transformers config class + overrides of the tiny shape
VARIANTS: dict[str, tuple[str, dict]] = {
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": 256}),
    # original_max_position_embeddings is tiny so that llama3 scaling changes some of a 16-wide head's frequencies
    "llama-rope-llama3": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "llama-rope-linear": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                               "factor": 4.0}}),
}


def date_rows() -> list[dict]:
    return [json.loads(line) for line in ASSETS.read_text().splitlines()]


def prompts(n: int = 20) -> list[list[dict]]:
    """`n` held-out user turns (rows the fixture models never trained on)."""
    return [[m for m in row["messages"] if m["role"] != "assistant"] for row in date_rows()[-n:]]


def build_variant(out: Path, name: str, texts: list[str]) -> Path:
    """A random-init model of VARIANTS[name] with tiny.py's tokenizer and shape, saved like build_tiny_model."""
    import torch
    import transformers

    cls_name, overrides = VARIANTS[name]
    tokenizer = train_tokenizer(texts, SPEC["vocab_size"])
    config = getattr(transformers, cls_name)(
        vocab_size=len(tokenizer), hidden_size=SPEC["hidden_size"], intermediate_size=SPEC["intermediate_size"],
        num_hidden_layers=SPEC["num_layers"], num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, initializer_range=SPEC["hidden_size"] ** -0.5, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_briefly(model_dir: Path, rows: list[dict], steps: int = TRAIN_STEPS, seed: int = 0) -> None:
    """Full fine-tune of every weight on whole rendered conversations (a few seconds), then save in place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (32,))
        loss = model(input_ids=batch["input_ids"][idx], attention_mask=batch["attention_mask"][idx],
                     labels=labels[idx]).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(model_dir)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(name)`: a briefly trained tiny model of a tiny.py family or a VARIANTS entry, built once."""
    built: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in built:
            rows = date_rows()[:TRAIN_ROWS]
            out = tmp_path_factory.mktemp(f"tiny-{name}")
            if name in VARIANTS:
                build_variant(out, name, corpus_of(rows))
            else:
                build_tiny_model(out, corpus_of(rows), TinySpec(family=name, **SPEC))
            train_briefly(out, rows)
            built[name] = out
        return built[name]

    return make
