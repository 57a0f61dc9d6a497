"""Offloaded checkpointing gives the gradients of no checkpointing and of torch's checkpoint, dropout included."""

from __future__ import annotations

import torch

from tunery.kernels.offload import enable_offload
from tunery.models.lora import apply_lora
from tunery.models.tiny import TinySpec, make_config, train_tokenizer


def _grads(model, ids):
    torch.manual_seed(3)  # same dropout masks each run; the recompute must redraw them identically
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_checkpointing_matches_plain_and_undoes():
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(["hello world 123", "user", "assistant"], vocab_size=300)
    torch.manual_seed(0)
    spec = TinySpec(family="qwen2", hidden_size=32, intermediate_size=64, num_layers=3)
    model = apply_lora(AutoModelForCausalLM.from_config(make_config(spec, tokenizer)), 4, 8, 0.3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    ids = torch.randint(0, len(tokenizer), (2, 13))
    ref_loss, ref = _grads(model, ids)
    assert enable_offload(model) == ([], [])  # nothing checkpointed: nothing to offload
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    _, plain = _grads(model, ids)
    done, undo = enable_offload(model)
    assert done == ["checkpointing with block inputs offloaded to pinned CPU memory x3"]
    for _ in range(2):  # twice: the offloader's bookkeeping is clean after each backward
        loss, got = _grads(model, ids)
        assert torch.allclose(loss, ref_loss)
        for name, g in ref.items():
            assert torch.allclose(got[name], g, atol=1e-6), name
            assert torch.allclose(plain[name], g, atol=1e-6), name
    for fn in undo:
        fn()
    assert all(getattr(m, "_gradient_checkpointing_func", None) is not None
               and "offloaded" not in repr(m._gradient_checkpointing_func)
               for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
