"""The fused LoRA linear against PEFT's computation, on random inputs (CPU here; bf16 on the GPU)."""

from __future__ import annotations

import pytest
import torch

from tunery.kernels.lora import fuse_lora, lora_linear


def _grads(impl, x, weight, bias, a, b, scale, grad_out):
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    out = lora_linear(x, weight, bias, a, b, scale, impl=impl)
    out.backward(grad_out)
    return out.detach(), x.grad, a.grad, b.grad


def _rel(got, ref):
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def _case(n, d_in, d_out, r, dtype, device, bias):
    g = torch.Generator().manual_seed(n + d_in)
    x = torch.randn(2, n, d_in, generator=g).to(device, dtype)
    weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device, dtype)
    b_ = (torch.randn(d_out, generator=g) * 0.1).to(device, dtype) if bias else None
    a = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(device)  # adapters train in fp32, as PEFT keeps them
    b = (torch.randn(d_out, r, generator=g) * 0.1).to(device)
    grad_out = torch.randn(2, n, d_out, generator=g).to(device, dtype)
    return x, weight, b_, a, b, 2.0, grad_out


@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_reference_fp32(bias):
    case = _case(33, 48, 80, 8, torch.float32, "cpu", bias)
    ref, got = _grads("reference", *case), _grads("fused", *case)
    for name, r, g in zip(("out", "dx", "dA", "dB"), ref, got):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert _rel(g, r) < 1e-5, (name, _rel(g, r))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2048, 4096, 4096), (2048, 4096, 14336), (2048, 14336, 4096), (1024, 896, 128)])
def test_fused_matches_reference_bf16_gpu(shape):
    n, d_in, d_out = shape
    case = _case(n, d_in, d_out, 16, torch.bfloat16, "cuda", d_out == 128)
    # the reference in fp32 is the truth; the fused bf16 op must be as close to it as PEFT's bf16 path is
    exact = _grads("reference", *[t.float() if torch.is_tensor(t) else t for t in case])
    ref, got = _grads("reference", *case), _grads("fused", *case)
    for name, e, r, g in zip(("out", "dx", "dA", "dB"), exact, ref, got):
        assert _rel(g, e) <= max(2 * _rel(r, e), 1e-2), (name, _rel(g, e), _rel(r, e))


def test_fuse_lora_keeps_outputs_grads_and_peft_format(tiny_lora, tiny_tokenizer, tmp_path):
    model = tiny_lora()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = run()
    keys = set(model.state_dict())
    done, undo = fuse_lora(model)
    assert done == ["fused LoRA x14 (base + adapter in one op, hand-written backward)"]
    got_loss, got_grads = run()
    assert torch.allclose(got_loss, ref_loss, rtol=1e-5)
    for name, g in ref_grads.items():
        assert _rel(got_grads[name], g) < 1e-5, name
    assert set(model.state_dict()) == keys
    with model.disable_adapter():  # the base model: PEFT's own path, adapter off
        base = model(input_ids=ids, labels=ids).loss
    assert not torch.allclose(base, got_loss)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    for fn in undo:
        fn()
    assert all("forward" not in vars(m) for m in model.modules())


def test_fused_dropout_draws_peft_masks(tiny_lora, tiny_tokenizer):
    """Same seed, same dropout masks: the fused op with LoRA dropout gives PEFT's loss and gradients."""
    model = tiny_lora(dropout=0.3)
    model.train()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11))

    def run():
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = run()
    done, _ = fuse_lora(model)
    assert done[0].startswith("fused LoRA x14")
    got_loss, got_grads = run()
    assert torch.allclose(got_loss, ref_loss, rtol=1e-5)
    for name, g in ref_grads.items():
        assert _rel(got_grads[name], g) < 1e-5, name
    torch.manual_seed(8)
    assert not torch.allclose(model(input_ids=ids, labels=ids).loss, got_loss)  # dropout does act
