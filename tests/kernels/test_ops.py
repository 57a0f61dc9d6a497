"""liger RMSNorm/SwiGLU swaps against the modules they replace, on the GPU (run on the device: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from tunery.kernels.apply import fast_path_for

pytestmark = pytest.mark.gpu


def _model(family: str):
    import transformers

    from tunery.models.lora import apply_lora

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    cfg = cls(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = apply_lora(model, 8, 16, 0.0)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so its gradients mean something
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _loss_and_grads(model, fast, batch):
    from tunery.eval.loss import summed_loss

    model.zero_grad(set_to_none=True)
    loss = summed_loss(model, batch, fast)
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_swapped_ops_match_the_reference_modules(family):
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the device")
    model = _model(family)
    ids = torch.randint(0, 1000, (2, 128), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ref_loss, ref_grads = _loss_and_grads(model, None, batch)
    fast = fast_path_for(model, "cuda", ops=True, compile=False)
    assert any("RMSNorm" in a for a in fast.applied) and any("SwiGLU" in a for a in fast.applied), fast.applied
    got_loss, got_grads = _loss_and_grads(model, fast, batch)
    assert abs(got_loss - ref_loss) / abs(ref_loss) < 1e-2
    for name, g in ref_grads.items():
        rel = float((got_grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 5e-2, (name, rel)
    fast.remove()
    again, _ = _loss_and_grads(model, None, batch)
    assert again == pytest.approx(ref_loss, rel=1e-6)
