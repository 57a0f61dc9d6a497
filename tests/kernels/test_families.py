"""The whole fast path on a tiny model of every family it serves (models/catalog.py's records): PEFT's loss and
LoRA gradients without checkpointing against the checkpointed, offloaded, stashed, grouped and compiled fast path
(CPU: fp32, compiled with aot_eager; GPU: bf16 with inductor, pytest -m gpu), and what it says it applied. The
batch has a right-padded row, which the fast path trains without the mask (train/loop.py)."""

from __future__ import annotations

import pytest
import torch

from tests.fastpath import fast_path
from tunery.data.tokenize import IGNORE
from tunery.models import catalog
from tunery.models.catalog import family_of
from tunery.models.tiny import FAMILIES

SLIDING = {"mistral", "gemma2", "gemma3_text"}  # given a window the test's sequences reach


def test_every_tiny_family_has_a_fast_path():
    with_fast_path = {t for f in catalog.FAMILIES if "fused_linear_ce" in f.pieces for t in f.model_types}
    assert set(FAMILIES) == with_fast_path


def _batch(vocab: int, device: str) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :4] = IGNORE  # a prompt
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def _fast_against_reference(model, batch, loss_and_grads, device, backend, **options):
    """PEFT with the padding mask, then the fast path (with these FastPathOptions) on the same batch without it, as
    train/loop.py runs it."""
    if model.config.model_type in SLIDING:
        model.config.sliding_window = 6
    ref = loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    fast = fast_path(model, device, allow_cpu=True, compile_backend=backend, **options)
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    return ref, loss_and_grads(model, unmasked, fast), fast


def _check_applied(model, fast) -> None:
    family = model.config.model_type
    record = family_of(family)
    text = fast.describe()
    loras = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    assert f"fused LoRA x{loras} " in text, text
    assert "block inputs offloaded to pinned CPU memory x2" in text and "one region x2" in text, text
    assert ("LoRA groups" in text) == bool(record.lora_groups), text
    assert ("base matmul skipped in recompute" in text) == bool(record.unread_in_recompute(family)), text
    # LFM2's convolution block has no attention sublayer, so no block keeps one
    assert ("attention kept for backward" in text) == (family != "lfm2"), text
    assert ("soft-capped" in text) == (family == "gemma2"), text


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_peft_on_each_family(family, tiny_lora, loss_and_grads, fresh_dynamo):
    model = tiny_lora(family, num_layers=2)  # LFM2: a convolution block, then an attention block
    batch = _batch(model.config.vocab_size, "cpu")
    (ref_loss, ref_grads), (loss, grads), fast = _fast_against_reference(
        model, batch, loss_and_grads, "cpu", "aot_eager",
        offload_keep_bytes=0,  # tiny tensors too go through the host copies
        stash_max_bytes_per_gflop=float("inf"))  # tiny blocks are all link
    _check_applied(model, fast)
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        rel = float((grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 1e-4, (name, rel)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_peft_on_each_family_bf16_gpu(family, tiny_lora, loss_and_grads, fresh_dynamo):
    """The same on the GPU, in bf16, at a width where the kernels run as they do on real models."""
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the device")
    model = tiny_lora(family, 2, hidden_size=256, intermediate_size=704, rank=8, b_std=0.02, device="cuda",
                      dtype=torch.bfloat16)
    batch = _batch(model.config.vocab_size, "cuda")
    (ref_loss, ref_grads), (loss, grads), fast = _fast_against_reference(model, batch, loss_and_grads, "cuda",
                                                                         "inductor")
    assert "fused LoRA" in fast.describe() and fast.compiled, fast.describe()
    assert abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)) < 1e-2
    for name, g in ref_grads.items():
        rel = float((grads[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12))
        assert rel < 5e-2, (name, rel)
