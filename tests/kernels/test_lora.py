"""The fused LoRA linear against PEFT's computation, on random inputs (CPU here; bf16 on the GPU)."""

from __future__ import annotations

import pytest
import torch

from tunery.kernels.lora import fuse_lora, lora_linear

from .conftest import GraphLog


def _grads_of(fn, x, a, b, grad_out):
    """(out, dx, dA, dB) of `fn(x, a, b)` on fresh leaf copies of the inputs."""
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    out = fn(x, a, b)
    out.backward(grad_out)
    return out.detach(), x.grad, a.grad, b.grad


def _grads(impl, x, weight, bias, a, b, scale, grad_out, nf4=None):
    return _grads_of(lambda x, a, b: lora_linear(x, weight, bias, a, b, scale, impl=impl, nf4=nf4), x, a, b,
                     grad_out)


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


def _nf4_weight(d_out, d_in, seed=0):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(d_out, d_in, generator=g).to(torch.bfloat16)
    return bnb.nn.Params4bit(data=dense, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")


def test_nf4_dequantizes_like_bitsandbytes_and_the_op_matches_its_reference():
    import bitsandbytes.functional as bnbf

    from tunery.kernels.lora import dequantize_nf4, nf4_of

    weight = _nf4_weight(80, 64)
    nf4 = nf4_of(weight)
    assert nf4 is not None and type(nf4.packed) is torch.Tensor and nf4.absmax2 is not None  # nested scales
    expected = bnbf.dequantize_4bit(weight, weight.quant_state).to(torch.float32)
    assert torch.equal(dequantize_nf4(nf4, torch.float32), expected)
    assert nf4_of(torch.nn.Linear(4, 4).weight) is None
    x, _, _, a, b, scale, grad_out = _case(9, 64, 80, 4, torch.float32, "cpu", False)

    ref, fused = (_grads(impl, x, None, None, a, b, scale, grad_out, nf4=nf4) for impl in ("reference", "fused"))
    dense = lora_linear(x, expected, None, a, b, scale, impl="reference")
    for name, r, g in zip(("out", "dx", "dA", "dB"), ref, fused):
        assert _rel(g, r) < 1e-5, (name, _rel(g, r))
    assert _rel(fused[0], dense) < 1e-5


def test_nf4_op_compiles_as_one_graph():
    """No graph break: bitsandbytes' tensor subclass and Python-side dequantization would split compiled regions."""
    from tunery.kernels.lora import _LoRALinear, nf4_of

    nf4 = nf4_of(_nf4_weight(48, 32))
    x, _, _, a, b, scale, _ = _case(5, 32, 48, 4, torch.float32, "cpu", False)
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))

    def step(x, a, b):
        return _LoRALinear.apply(x, None, None, nf4, None, a, b, scale, False).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    loss = compiled(x, a, b)
    loss.backward()
    expected = step(x.detach(), a.detach(), b.detach())
    assert torch.allclose(loss.detach(), expected, rtol=1e-5) and a.grad is not None and x.grad is not None


@pytest.mark.parametrize("dropout", [False, True])
def test_compiled_nf4_op_keeps_no_dense_weight_in_the_graph(fresh_dynamo, dropout):
    """Split as inductor splits it, the compiled 4-bit op dequantizes inside its opaque matmul ops, forward and
    backward: no dense weight is a value of either graph (so none can be saved or held across other work), and
    the results are the eager op's. With LoRA dropout, backward's dx is `dy W` alone, through the same op."""
    from tunery.kernels.lora import _LoRALinear, nf4_of

    nf4 = nf4_of(_nf4_weight(48, 32))
    x, _, _, a, b, scale, grad_out = _case(5, 32, 48, 4, torch.float32, "cpu", False)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.3).float()

    def op(x, a, b):
        return _LoRALinear.apply(x, x * mask if dropout else None, None, nf4, None, a, b, scale, False)

    eager = _grads_of(op, x, a, b, grad_out)
    log = GraphLog(min_cut=True)
    compiled = _grads_of(torch.compile(op, fullgraph=True, backend=log), x, a, b, grad_out)
    (_, forward), (_, backward) = log.aot
    assert "tunery.lora_out_nf4" in forward.code and "dequantize_4bit" not in forward.code, forward.code
    assert "tunery.lora_dx_nf4" in backward.code and "dequantize_4bit" not in backward.code, backward.code
    assert (48, 32) not in log.saved(), log.saved()
    for name, e, g in zip(("out", "dx", "dA", "dB"), eager, compiled):
        assert _rel(g, e) < 1e-6, (name, _rel(g, e))


def test_nf4_ops_match_their_fake_kernels():
    """The opaque 4-bit ops' schemas and fake kernels (the shapes inductor plans with) against their real results."""
    from tunery.kernels.lora import _nf4_args, nf4_of

    nf4 = nf4_of(_nf4_weight(48, 32))
    x, _, _, a, b, scale, grad_out = _case(5, 32, 48, 4, torch.float32, "cpu", False)
    x2, g = x.reshape(-1, 32), grad_out.reshape(-1, 48)
    ops = torch.ops.tunery
    for op, args in ((ops.lora_out_nf4.default, (x2, *_nf4_args(nf4), None, x2 @ a.t(), b, scale)),
                     (ops.lora_dx_nf4.default, (g, *_nf4_args(nf4), g @ b, a)),
                     (ops.lora_dx_nf4.default, (g, *_nf4_args(nf4), None, None))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_op_adds_the_adapter_in_place_without_copying_the_base_output(bias, fresh_dynamo):
    """Traced, the shared-output matmuls must stay the opaque tunery ops (a functionalized `addmm_` copies the
    whole base output first), in forward and in backward, and give the eager op's results."""
    x, weight, b_, a, b, scale, grad_out = _case(7, 32, 48, 4, torch.float32, "cpu", bias)
    eager = _grads("fused", x, weight, b_, a, b, scale, grad_out)
    log = GraphLog()
    compiled = torch.compile(lambda x, a, b: lora_linear(x, weight, b_, a, b, scale), fullgraph=True, backend=log)
    got = _grads_of(compiled, x, a, b, grad_out)
    (_, forward), (_, backward) = log.aot
    assert "tunery.lora_out" in forward.code and "addmm" not in forward.code, forward.code
    assert "tunery.lora_dx" in backward.code and "addmm" not in backward.code, backward.code
    for name, e, g in zip(("out", "dx", "dA", "dB"), eager, got):
        assert _rel(g, e) < 1e-6, (name, _rel(g, e))


def test_recompute_skips_the_unread_down_projection(tiny_lora, tiny_tokenizer, loss_and_grads, monkeypatch):
    """Fused LoRA + offloaded checkpointing: the same loss and gradients as PEFT with no checkpointing, and
    the down projection's base matmul runs in forward and backward but not in the recompute."""
    from tests.fastpath import fast_path
    from tunery.kernels import lora as klora

    model = tiny_lora("llama", num_layers=2)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ref_loss, ref_grads = loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    fast = fast_path(model, "cpu", allow_cpu=True, compile=False)
    assert "mlp.down_proj base matmul skipped in recompute x2" in fast.describe()
    down_shape = model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.shape
    calls = []
    real_out, real_dx = klora._out, klora._dx
    monkeypatch.setattr(klora, "_out", lambda x2, w, *a: calls.append(("out", tuple(w.shape))) or real_out(x2, w, *a))
    monkeypatch.setattr(klora, "_dx", lambda g, w, *a: calls.append(("dx", tuple(w.shape))) or real_dx(g, w, *a))
    got_loss, got_grads = loss_and_grads(model, batch, fast)
    # per layer, its base matmul ran in forward and its dx in backward; the recompute skipped it
    assert calls.count(("out", tuple(down_shape))) == 2 and calls.count(("dx", tuple(down_shape))) == 2, calls
    assert torch.allclose(got_loss, ref_loss, rtol=1e-5)
    for name, g in ref_grads.items():
        assert _rel(got_grads[name], g) < 1e-5, name


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2048, 4096, 14336), (2048, 14336, 4096)])
def test_nf4_op_compiled_matches_reference_bf16_gpu(shape):
    """The 4-bit op inside an inductor-compiled graph (as in training) against the dense reference in fp32."""
    import bitsandbytes as bnb

    from tunery.kernels.lora import _LoRALinear, dequantize_nf4, nf4_of

    n, d_in, d_out = shape
    x, weight, _, a, b, scale, grad_out = _case(n, d_in, d_out, 16, torch.bfloat16, "cuda", False)
    nf4 = nf4_of(bnb.nn.Params4bit(data=weight.cpu(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True).to("cuda"))
    dense = dequantize_nf4(nf4, torch.bfloat16)
    exact = _grads("reference", x.float(), dense.float(), None, a, b, scale, grad_out.float())
    ref = _grads("reference", x, dense, None, a, b, scale, grad_out)
    compiled = torch.compile(lambda x, a, b: _LoRALinear.apply(x, None, None, nf4, None, a, b, scale, False),
                             fullgraph=True)
    got = _grads_of(compiled, x, a, b, grad_out)
    for name, e, r, g in zip(("out", "dx", "dA", "dB"), exact, ref, got):
        assert _rel(g, e) <= max(2 * _rel(r, e), 1e-2), (name, _rel(g, e), _rel(r, e))
