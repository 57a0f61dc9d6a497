"""The fast path on a real (tiny) PEFT model gives the reference loss and gradients, and says what it did."""

from __future__ import annotations

import pytest
import torch

from tests.fastpath import fast_path
from tunery.data.tokenize import IGNORE
from tunery.models.lora import apply_lora
from tunery.models.tiny import TinySpec, make_config, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["hello world 123", "user", "assistant", "the quick brown fox"], vocab_size=300)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_fused_loss_equals_reference_loss_and_lora_grads(tokenizer, family, loss_and_grads):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    spec = TinySpec(family=family, hidden_size=32, intermediate_size=64, num_layers=2)
    model = apply_lora(AutoModelForCausalLM.from_config(make_config(spec, tokenizer)), 4, 8, 0.0)
    ids = torch.randint(0, len(tokenizer), (3, 17))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    ref_loss, ref_grads = loss_and_grads(model, batch)
    fast = fast_path(model, "cpu", allow_cpu=True, compile=False)
    assert "fused linear+cross-entropy" in fast.describe() and "fused LoRA x14" in fast.describe()
    got_loss, got_grads = loss_and_grads(model, batch, fast)
    assert torch.allclose(got_loss, ref_loss, rtol=1e-5)
    assert ref_grads.keys() == got_grads.keys()
    for name, g in ref_grads.items():
        rel = float((got_grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 1e-5, (name, rel)


def test_fast_path_reasons(tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(make_config(TinySpec(hidden_size=32, intermediate_size=64,
                                                                  num_layers=1), tokenizer))
    assert "CPU" in fast_path(model, "cpu").describe()
    assert "--no-fast" in fast_path(model, "cuda", enabled=False).describe()
    assert "DDP" in fast_path(model, "cuda", distributed=True).describe()
    fast = fast_path(model, "cuda")
    assert fast.applied and fast.compiled
    fast.remove()
    assert not fast.compiled and fast.applied == ["fused linear+cross-entropy (chunked; no full-vocabulary logits)"]
    assert not fast_path(model, "cpu", allow_cpu=True, compile=False).compiled
