"""Grouped LoRA projections (q/k/v, gate/up as one matmul with their adapters) against PEFT's own forward and
autograd, on random inputs (fp32 on the CPU here; bf16 on the GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from tunery.kernels.lora import fuse_lora
from tunery.kernels.lora_group import group_lora
from tunery.kernels.options import FastPathOptions, StepState
from tunery.models.catalog import family_of

MEMBERS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def _rel(got, ref):
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def _adapters(members):
    return [p for m in members for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]


def _run(members, x, grad_outs, order=None):
    """Each member's output for `x`, called in `order` (indices; default: in turn), backward with `grad_outs`:
    (outputs, dx, the adapters' grads)."""
    x = x.detach().clone().requires_grad_(True)
    params = _adapters(members)
    for p in params:
        p.grad = None
    outs = [None] * len(members)
    for i in order or range(len(members)):
        outs[i] = members[i](x)
    torch.autograd.backward(outs, grad_outs)
    return [o.detach() for o in outs], x.grad, [p.grad.clone() for p in params]


def _grouped(model, family="llama", **options):
    """Fused then grouped as fast_path_for does it (the family's groups, one StepState), with these
    FastPathOptions."""
    state = StepState()
    fuse_lora(model, state=state)
    return group_lora(model, family_of(family).lora_groups, model.get_base_model().model,
                      FastPathOptions(**options), state)


def _check(got, ref, tol):
    for name, g, r in zip(("outputs", "dx", "adapter grads"), got, ref):
        for a, b in zip(g if isinstance(g, list) else [g], r if isinstance(r, list) else [r]):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert _rel(a, b) < tol, (name, _rel(a, b))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2's q/k/v carry a bias
@pytest.mark.parametrize("kcat", [True, False])  # dx through one widened matmul, or the chained matmuls
@pytest.mark.parametrize("parent", ["self_attn", "mlp"])
def test_group_matches_peft_fp32(tiny_lora, family, kcat, parent):
    model = tiny_lora(family)
    module = getattr(model.get_base_model().model.layers[0], parent)
    members = [getattr(module, n) for n in MEMBERS[parent]]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, members[0].in_features, generator=g)
    grad_outs = [torch.randn(2, 11, m.out_features, generator=g) for m in members]
    ref = _run(members, x, grad_outs)
    weights = [m.get_base_layer().weight.detach().clone() for m in members]

    done, undo = _grouped(model, family, group_kcat_backward_max_width=float("inf") if kcat else 0.0)
    assert done and done[0].endswith("x4"), done  # q/k/v and gate/up in each of the two layers
    group = members[0]._tunery_group[0]
    assert group.kcat_backward is kcat
    for m, w in zip(members, weights):  # the base weights live in the group's buffer, unchanged
        assert m.get_base_layer().weight.untyped_storage().data_ptr() == group.s.untyped_storage().data_ptr()
        assert torch.equal(m.get_base_layer().weight, w)
    got = _run(members, x, grad_outs)
    _check(got, ref, 1e-5)
    storages = [o.untyped_storage().data_ptr() for o in got[0]]  # v apart (attention keeps it); the rest one buffer
    assert storages[1:] == ([storages[0], storages[2]] if parent == "self_attn" else [storages[0]])
    assert parent == "mlp" or storages[2] != storages[0]
    _check(_run(members, x, grad_outs, order=list(range(len(members)))[::-1]), ref, 1e-5)  # others alone

    for fn in reversed(undo):
        fn()
    for m, w in zip(members, weights):
        assert m.get_base_layer().weight.is_contiguous() and torch.equal(m.get_base_layer().weight, w)
        assert not hasattr(m, "_tunery_group")


def test_group_follows_adapter_updates(tiny_lora, tiny_tokenizer, loss_and_grads):
    """The adapter slots are refreshed when the adapters change in place (an optimizer step): the model's loss and
    gradients stay PEFT's, before and after; removing the fast path puts PEFT's layers back."""
    from tests.fastpath import fast_path

    model = tiny_lora("llama")
    reference = copy.deepcopy(model)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    fast = fast_path(model, "cpu", allow_cpu=True, compile=False)
    assert "LoRA groups with the adapters inside one matmul (gate_proj/up_proj, q_proj/k_proj/v_proj) x4" \
        in fast.describe(), fast.describe()
    for step in range(2):
        got, ref = loss_and_grads(model, batch, fast), loss_and_grads(reference, batch)
        assert torch.allclose(got[0], ref[0], rtol=1e-5), (step, got[0], ref[0])
        for name, r in ref[1].items():
            assert _rel(got[1][name], r) < 1e-5, (step, name)
        with torch.no_grad():  # what an optimizer step does: in-place updates
            for m in (model, reference):
                for p in m.parameters():
                    if p.requires_grad:
                        p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    fast.remove()
    got, ref = loss_and_grads(model, batch), loss_and_grads(reference, batch)
    assert torch.allclose(got[0], ref[0], rtol=1e-6)


def test_dropout_keeps_each_projection_alone(tiny_lora, tiny_tokenizer, loss_and_grads):
    """With LoRA dropout in training the group is not used (each projection draws its own mask), and the results
    are still PEFT's for the same masks."""
    model = tiny_lora("llama", dropout=0.3)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    _grouped(model)
    group = model.get_base_model().model.layers[0].mlp.gate_proj._tunery_group[0]
    assert not group.ready()
    torch.manual_seed(5)
    got = loss_and_grads(model, batch)
    torch.manual_seed(5)
    ref = loss_and_grads(reference, batch)
    assert torch.allclose(got[0], ref[0], rtol=1e-5)
    model.eval()
    assert group.ready()


def test_opaque_ops_agree_with_their_fake_kernels():
    """What torch.compile is told of each op's outputs (its fake kernel) is what the op returns: a wrong shape or
    stride fails only inside inductor's compiled code, on the GPU."""
    g = torch.Generator().manual_seed(0)
    x, w, a = torch.randn(8, 6, generator=g), torch.randn(10, 6 + 3, generator=g), torch.randn(3, 6, generator=g)
    grads, gb = [torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g)], torch.randn(8, 3, generator=g)
    w_bwd = torch.randn(10 + 3, 6, generator=g)
    ops = torch.ops.tunery
    for op, args in ((ops.lora_group_out.default, (x, w, None, a)), (ops.lora_group_out.default, (x, w, w[:, 0], a)),
                     (ops.lora_group_dx.default, (grads, gb, w_bwd)),
                     (ops.lora_group_dx_chain.default, (grads, gb, w_bwd[10:], [w_bwd[:4], w_bwd[4:10]])),
                     (ops.lora_out.default, (x, w[:, :6], None, x[:, :3], w[:, 6:], 2.0)),
                     (ops.lora_dx.default, (grads[1], w_bwd[:6], gb, a))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("parent", ["self_attn", "mlp"])
@pytest.mark.parametrize("shape", [(2048, 8192, 32, 8), (896, 4864, 14, 2)])  # Llama-3.2-1B, Qwen2.5-0.5B
def test_group_matches_peft_bf16_gpu(parent, shape):
    """bf16 on the GPU, against PEFT in fp32 as the truth: as close as PEFT's own bf16 path is."""
    import transformers

    from tunery.models.lora import apply_lora

    hidden, inter, heads, kv = shape
    family = "llama" if hidden == 2048 else "qwen2"
    cfg_cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    cfg = cfg_cls(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                  num_hidden_layers=1, vocab_size=256)
    torch.manual_seed(0)
    model = apply_lora(transformers.AutoModelForCausalLM.from_config(cfg), 16, 32, 0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    exact = copy.deepcopy(model).cuda()
    model = model.cuda().to(torch.bfloat16)
    for name, p in model.named_parameters():  # adapters train in fp32, as PEFT keeps them
        if "lora_" in name:
            p.data = p.data.float()
    pick = lambda m: [getattr(getattr(m.get_base_model().model.layers[0], parent), n) for n in MEMBERS[parent]]  # noqa: E731
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 1024, hidden, device="cuda", generator=g)
    grad_outs = [torch.randn(2, 1024, m.out_features, device="cuda", generator=g) for m in pick(model)]
    truth = _run(pick(exact), x, grad_outs)
    bf16 = [t.to(torch.bfloat16) for t in grad_outs]
    ref = _run(pick(model), x.to(torch.bfloat16), bf16)
    _grouped(model, family)
    got = _run(pick(model), x.to(torch.bfloat16), bf16)
    for name, e, r, o in zip(("outputs", "dx", "adapter grads"), truth, ref, got):
        for e_, r_, o_ in zip(*(t if isinstance(t, list) else [t] for t in (e, r, o))):
            assert _rel(o_, e_) <= max(2 * _rel(r_, e_), 1e-2), (name, _rel(o_, e_), _rel(r_, e_))


def test_wide_models_keep_projections_apart(tiny_lora):
    """Past group_max_width the buffer's extra memory outweighs the gain: nothing is grouped, weights stay as they
    were."""
    model = tiny_lora("llama")
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer().weight
    pointer = weight.data_ptr()
    assert _grouped(model, group_max_width=31) == ([], [])  # the tiny model is 32 wide
    assert weight.data_ptr() == pointer and not hasattr(model.get_base_model().model.layers[0].mlp.up_proj,
                                                        "_tunery_group")
