"""cuDNN-first attention gives transformers' sdpa outputs (padded and packed batches), and undoes cleanly."""

from __future__ import annotations

import pytest
import torch

from tunery.kernels.attention import NAME, cudnn_first_attention, use_cudnn_attention


def test_same_outputs_as_sdpa_padded_and_packed(tiny_lora, tiny_tokenizer):
    model = tiny_lora("qwen2")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])  # three documents in one row

    def outputs():
        return model(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids[:1], position_ids=packed).logits

    with torch.no_grad():
        padded_ref, packed_ref = outputs()
        assert not torch.allclose(packed_ref, model(input_ids=ids[:1]).logits)  # the documents' mask acts
        done, undo = use_cudnn_attention(model)
        assert done and model.config._attn_implementation == NAME
        padded, packed_out = outputs()
    assert torch.allclose(padded, padded_ref, atol=1e-6) and torch.allclose(packed_out, packed_ref, atol=1e-6)
    for fn in undo:
        fn()
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert use_cudnn_attention(model) == ([], [])  # another implementation: left alone


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 32, 8, 2048, 128), (8, 14, 2, 2048, 64)])
def test_cudnn_first_matches_flash_bf16_gpu(shape):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, kv, s, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b, kv, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    grad = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, h // kv

    def run(fn):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv)
        out.backward(grad)
        return out.detach(), qq.grad, kk.grad, vv.grad

    def ours(qq, kk, vv):
        return cudnn_first_attention(module, qq, kk, vv, None)[0]

    def exact(qq, kk, vv):  # fp32 math: the truth both kernels approximate
        with sdpa_kernel(SDPBackend.MATH):
            return cudnn_first_attention(module, qq.float(), kk.float(), vv.float(), None)[0]

    def flash(qq, kk, vv):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return cudnn_first_attention(module, qq, kk, vv, None)[0]

    truth, ref, got = run(exact), run(flash), run(ours)
    for name, e, r, o in zip(("out", "dq", "dk", "dv"), truth, ref, got):
        err = float((o.float() - e).norm() / e.norm())
        assert err <= max(2 * float((r.float() - e).norm() / e.norm()), 1e-2), (name, err)


@pytest.mark.gpu
def test_training_step_runs_cudnn_attention_not_flash():
    """Inside the compiled blocks of a checkpointed training step (transformers' q/k/v layouts, the offloaded
    recompute), attention must run cuDNN's kernels: the speed in docs/benchmarks.md rests on it."""
    import transformers

    from tests.fastpath import fast_path
    from tunery.models.lora import apply_lora
    from tunery.train.loss import summed_loss

    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = apply_lora(model, 8, 16, 0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    fast = fast_path(model, "cuda")
    assert "cuDNN" in fast.describe()
    ids = torch.randint(0, 1000, (2, 1024), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    summed_loss(model, batch, fast).backward()  # compiles
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        summed_loss(model, batch, fast).backward()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert any("cudnn" in n.lower() for n in names), names
    assert not any("pytorch_flash" in n for n in names), [n for n in names if "flash" in n]
