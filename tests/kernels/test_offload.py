"""Offloaded checkpointing gives the gradients of no checkpointing and of torch's checkpoint, dropout included."""

from __future__ import annotations

import torch

from tunery.kernels.offload import enable_offload


def _grads(model, ids):
    torch.manual_seed(3)  # same dropout masks each run; the recompute must redraw them identically
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_checkpointing_matches_plain_and_undoes(tiny_lora, tiny_tokenizer):
    model = tiny_lora("qwen2", num_layers=3, dropout=0.3)
    model.train()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 13))
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
