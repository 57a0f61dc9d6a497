"""Packed rows through varlen attention (kernels/varlen.py): each example attends to itself only, so a packed row's
loss and LoRA gradients equal each example's alone. The CPU has no varlen kernel: there a stand-in with each of
torch's two signatures runs sdpa example by example, which checks everything around the kernel (bounds, layout,
GQA, scale, which rows and layers take it). The GPU test runs torch's kernel against sdpa's dense mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.fastpath import fast_path
from tunery.data.tokenize import IGNORE, Tokenized
from tunery.kernels import varlen
from tunery.models.tiny import FAMILIES
from tunery.train.batching import collate, pack_batch

SDPA_FAMILIES = [f for f in FAMILIES if f not in ("lfm2", "gemma2")]  # LFM2: its own test below; Gemma 2 runs eager
SLIDING = {"mistral", "gemma3_text"}  # given a window the longest example reaches: those layers keep sdpa's mask


class StandIn:
    """sdpa over each example; records the calls. `new`: torch 2.11+'s keywords, else 2.9's."""

    def __init__(self, new: bool = True):
        self.calls = []
        self.fn = self._new if new else self._old

    def _run(self, q, k, v, bounds, max_q, max_k, scale=None, gqa=False, left=-1):
        self.calls.append({"bounds": bounds.tolist(), "max": (max_q, max_k), "heads": (q.shape[1], k.shape[1]),
                           "scale": scale, "left": left})
        b, outs = bounds.tolist(), []
        for s, e in zip(b, b[1:]):
            if e == s:  # an empty example (fixed-size bounds): flash attention's loop over it does nothing
                continue
            i = torch.arange(e - s)
            seen = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] <= left) if left >= 0 else True)
            outs.append(F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)),
                                                       attn_mask=seen, scale=scale, enable_gqa=gqa)[0].transpose(0, 1))
        return torch.cat(outs)

    def _new(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1), enable_gqa=False):
        assert window_size[1] == 0 and torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
        return self._run(query, key, value, cu_seq_q, max_q, max_k, scale, enable_gqa, window_size[0])

    def _old(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and query.shape[1] == key.shape[1]  # 2.9's kernel took no GQA
        return self._run(query, key, value, cu_seq_q, max_q, max_k)


def _with(monkeypatch, stand_in: StandIn) -> None:
    monkeypatch.setattr(varlen, "_kernel", lambda: stand_in.fn)


def _examples(vocab: int, lengths=(9, 3, 14, 6)) -> list[Tokenized]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [IGNORE] * (n // 3) + ids[n // 3 :], False))
    return out


def _loss_and_grads(model, batches, fast=None):
    from tunery.train.loss import summed_loss

    model.zero_grad(set_to_none=True)
    loss = sum(summed_loss(model, b, fast) for b in batches)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(got, ref, rtol: float = 1e-5, grad_rtol: float = 1e-5):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert abs(float(loss) - float(ref_loss)) <= rtol * abs(float(ref_loss)), (float(loss), float(ref_loss))
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in ref_grads.items():
        rel = float((grads[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12))
        assert rel < grad_rtol, (name, rel)


def test_pack_batch_gives_each_example_bounds_and_the_tail_its_own():
    batch = [Tokenized([5, 6, 7], [IGNORE, 6, 7], False), Tokenized([8, 9], [8, 9], False)]
    assert pack_batch(batch, "cpu")["doc_bounds"].tolist() == [0, 3, 5]
    rounded = pack_batch(batch, "cpu", multiple=8)
    assert rounded["doc_bounds"].tolist() == [0, 3, 5, 8] and rounded["doc_bounds"].dtype == torch.int32
    assert pack_batch(batch, "cpu", multiple=5)["doc_bounds"].tolist() == [0, 3, 5]  # no tail, no empty one


@pytest.mark.parametrize("new", [True, False], ids=["window_size", "is_causal"])
@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_a_packed_row_through_varlen_attention_equals_each_example_alone(family, new, tiny_lora, monkeypatch):
    stand_in = StandIn(new)
    _with(monkeypatch, stand_in)
    model = tiny_lora(family, num_layers=2)
    examples = _examples(model.config.vocab_size)
    alone = _loss_and_grads(model, [collate([t], 0, "cpu") for t in examples])
    fast = fast_path(model, "cpu", allow_cpu=True, compile=False, packing=True)
    assert "packed rows through varlen flash attention" in fast.describe(), fast.describe()
    _assert_close(_loss_and_grads(model, [pack_batch(examples, "cpu", multiple=24)], fast), alone)
    # each layer's forward took the kernel once, over the examples and the tail, with the row's length
    assert len(stand_in.calls) == 2
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    for call in stand_in.calls:
        assert call["bounds"] == [0, 9, 12, 26, 32, 48] and call["max"] == (48, 48)
        assert call["heads"] == (heads, kv_heads if new else heads)
    # undone, the model is the reference again
    fast.remove()
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("new", [True, False], ids=["window_size", "is_causal"])
@pytest.mark.parametrize("family", sorted(SLIDING))
def test_a_sliding_window_the_row_reaches(family, new, tiny_lora, monkeypatch):
    """torch's newer kernel takes the window; under the older one those layers keep the mask. Equal either way."""
    stand_in = StandIn(new)
    _with(monkeypatch, stand_in)
    model = tiny_lora(family, num_layers=2)
    model.config.sliding_window = 5  # every layer of these tiny models slides; the longest example reaches it
    for m in model.modules():  # Gemma 3's attention modules read their window from the config when built
        if getattr(m, "sliding_window", None):
            m.sliding_window = 5
    examples = _examples(model.config.vocab_size)
    alone = _loss_and_grads(model, [collate([t], 0, "cpu") for t in examples])
    fast = fast_path(model, "cpu", allow_cpu=True, compile=False, packing=True)
    assert "varlen" in fast.describe()
    _assert_close(_loss_and_grads(model, [pack_batch(examples, "cpu", multiple=16)], fast), alone)
    assert [c["left"] for c in stand_in.calls] == ([4, 4] if new else [])


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_the_whole_fast_path_on_a_packed_row(family, tiny_lora, monkeypatch, fresh_dynamo):
    """Checkpointed, offloaded, attention stashed, compiled (aot_eager), as `tunery train --packing` runs it."""
    stand_in = StandIn()
    _with(monkeypatch, stand_in)
    model = tiny_lora(family, num_layers=2)
    examples = _examples(model.config.vocab_size)
    alone = _loss_and_grads(model, [collate([t], 0, "cpu") for t in examples])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    fast = fast_path(model, "cpu", allow_cpu=True, compile_backend="aot_eager", packing=True,
                     offload_keep_bytes=0,  # tiny tensors too go through the host copies
                     stash_max_bytes_per_gflop=float("inf"))  # tiny blocks are all link
    text = fast.describe()
    assert "varlen" in text and "attention kept for backward" in text and "one region" in text, text
    _assert_close(_loss_and_grads(model, [pack_batch(examples, "cpu", multiple=24)], fast), alone, grad_rtol=1e-4)
    assert len(stand_in.calls) == 2  # the stash keeps attention from forward: the recompute does not call it
    # a token-budget row: padded to a set length, its bounds to a set size with empty examples at the end
    row = pack_batch(examples, "cpu", length=48, fixed_bounds=True)
    assert row["doc_bounds"].tolist() == [0, 9, 12, 26, 32, 48, 48, 48]
    _assert_close(_loss_and_grads(model, [row], fast), alone, grad_rtol=1e-4)


def test_the_whole_fast_path_on_a_packed_lfm2_row_with_its_convolutions_bounded(tiny_lora, monkeypatch):
    """LFM2 as `tunery train --packing` runs it: checkpointed with its block inputs offloaded, its attention block
    through varlen attention and its convolution block bounded at each example's start (models/packing.py), on
    rows of two lengths; each row's loss and gradients equal its examples' alone. (Compiled: the next test.)"""
    from tunery.models.packing import bound_convolutions

    stand_in = StandIn()
    _with(monkeypatch, stand_in)
    model = tiny_lora("lfm2", num_layers=2)
    examples = _examples(model.config.vocab_size)
    alone = _loss_and_grads(model, [collate([t], 0, "cpu") for t in examples])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    fast = fast_path(model, "cpu", allow_cpu=True, compile=False, packing=True, offload_keep_bytes=0)
    text = fast.describe()
    assert "varlen" in text and "offloaded" in text and bound_convolutions(model) == 1, text
    for row in (pack_batch(examples, "cpu", multiple=24, seq_idx=True),
                pack_batch(examples, "cpu", length=64, fixed_bounds=True, seq_idx=True)):
        _assert_close(_loss_and_grads(model, [row], fast), alone, grad_rtol=1e-4)
    assert stand_in.calls  # the attention block took the varlen kernel


def test_a_bounded_convolution_block_compiles_whole_once_for_every_row_length(tiny_lora, fresh_dynamo):
    """The bounded forward in one graph (fullgraph: a break would raise), its length dynamic from the first row:
    rows of three lengths, one compile, each equal to the uncompiled block."""
    from torch._dynamo.utils import counters

    from tunery.kernels.dynamic import mark_length
    from tunery.models.packing import bound_convolutions

    model = tiny_lora("lfm2", num_layers=2)
    bound_convolutions(model)
    (block,) = [m for m in model.modules() if type(m).__name__ == "Lfm2ShortConv"]
    compiled = torch.compile(lambda h, idx: block(h, seq_idx=idx), fullgraph=True, backend="aot_eager")
    counters.clear()  # what earlier tests of this process compiled
    g = torch.Generator().manual_seed(0)
    for n in (48, 64, 80):
        hidden = torch.randn(1, n, model.config.hidden_size, generator=g)
        seq_idx = torch.tensor([[i * 3 // n for i in range(n)]], dtype=torch.int32)  # three examples
        mark_length((hidden, seq_idx), n)  # as a block's checkpoint hook marks its inputs
        torch.testing.assert_close(compiled(hidden, seq_idx), block(hidden, seq_idx=seq_idx))
    assert counters["stats"]["unique_graphs"] == 1


def test_packed_rows_of_other_lengths_and_example_counts_compile_once(tiny_lora, monkeypatch, fresh_dynamo):
    """Token-budget rows differ in length and in how many examples they hold (their fixed-size bounds grow from 8
    to 16 entries): the length marked dynamic before compiled code sees it (kernels/dynamic.py), the first row's
    compiles serve every later one, and each row's loss and gradients still equal its examples' alone. (The
    stand-in runs outside the graph, so here the bounds' size is not guarded on; torch's kernel, in the graph
    on the GPU, reads them, and they are marked dynamic too.)"""
    from tests.kernels.conftest import GraphLog
    from tunery.kernels.dynamic import mark_length

    stand_in = StandIn()
    kernel = stand_in.fn

    @torch.compiler.disable  # outside the graph, as torch's kernel is one op in it: dynamo traces no test code
    def opaque(query, *args, **kwargs):
        out = kernel(query, *args, **kwargs)
        mark_length(out, query.shape[0])  # what comes back from eager code is marked, as kernels/offload.py does
        return out

    stand_in.fn = opaque
    _with(monkeypatch, stand_in)
    model = tiny_lora("llama", num_layers=2)
    vocab = model.config.vocab_size
    rows = [_examples(vocab, (9, 3, 14, 6)), _examples(vocab, (20, 31, 5, 17, 12)),
            _examples(vocab, (4, 6, 5, 7, 3, 8, 6, 5, 9, 4))]
    alone = [_loss_and_grads(model, [collate([t], 0, "cpu") for t in examples]) for examples in rows]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    log = GraphLog()
    fast = fast_path(model, "cpu", allow_cpu=True, compile_backend=log, packing=True, offload_keep_bytes=0,
                     stash_max_bytes_per_gflop=float("inf"))
    counts = []
    for examples, want, length in zip(rows, alone, (48, 96, 80)):
        row = pack_batch(examples, "cpu", length=length, fixed_bounds=True)
        _assert_close(_loss_and_grads(model, [row], fast), want, grad_rtol=1e-4)
        counts.append((len(log.dynamo), len(row["doc_bounds"])))
    assert [c for _, c in counts] == [8, 8, 16]
    assert counts[0][0] == counts[-1][0], counts


def test_rows_with_a_mask_keep_sdpa(tiny_lora, monkeypatch):
    stand_in = StandIn()
    _with(monkeypatch, stand_in)
    model = tiny_lora("qwen2", num_layers=2)
    examples = _examples(model.config.vocab_size)
    padded = collate(examples, 0, "cpu")  # the held-out loss's batches: padded rows with their mask
    ref = _loss_and_grads(model, [padded])
    fast = fast_path(model, "cpu", allow_cpu=True, compile=False, packing=True)
    assert "varlen" in fast.describe()
    _assert_close(_loss_and_grads(model, [padded]), ref)
    assert stand_in.calls == []


def test_the_old_kernel_gets_repeated_heads_and_refuses_a_scale_it_cannot_take():
    q, k = torch.randn(11, 4, 8), torch.randn(11, 2, 8)
    bounds = torch.tensor([0, 5, 11], dtype=torch.int32)
    new, old = StandIn(True), StandIn(False)
    plan_new, plan_old = varlen.Plan.of(new.fn), varlen.Plan.of(old.fn)
    assert (plan_new.causal, plan_new.scale, plan_new.gqa) == (("window_size", (-1, 0)), True, True)
    assert (plan_old.causal, plan_old.scale, plan_old.gqa) == (("is_causal", True), False, False)
    out_new = varlen.varlen_call(plan_new, q, k, k, bounds, 11, 8 ** -0.5)
    out_old = varlen.varlen_call(plan_old, q, k, k, bounds, 11, 8 ** -0.5)  # the default scale: fine without one
    assert torch.allclose(out_new, out_old, atol=1e-6)
    assert old.calls[0]["heads"] == (4, 4) and new.calls[0]["heads"] == (4, 2)
    with pytest.raises(RuntimeError, match="no scale argument"):
        varlen.varlen_call(plan_old, q, k, k, bounds, 11, 0.5)
    # and each example attends to itself only: the second's output ignores the first's keys
    alone = varlen.varlen_call(plan_new, q[5:], k[5:], k[5:], torch.tensor([0, 6], dtype=torch.int32), 6, None)
    assert torch.allclose(out_new[5:], alone, atol=1e-6)


def test_what_keeps_a_model_off_varlen(tiny_lora, monkeypatch):
    model = tiny_lora("llama", num_layers=1)
    assert varlen.varlen_problem(model) == "varlen attention runs on CUDA only"  # torch's own kernel, on the CPU
    assert "varlen" not in fast_path(model, "cpu", allow_cpu=True, compile=False, packing=True).describe()
    _with(monkeypatch, StandIn())
    assert varlen.varlen_problem(model) is None
    assert "varlen" not in fast_path(model, "cpu", allow_cpu=True, compile=False).describe()  # not packing
    model.config.attention_dropout = 0.1
    assert varlen.varlen_problem(model) == "attention dropout is on"
    model.config.attention_dropout = 0.0
    model.set_attn_implementation("eager")
    assert varlen.varlen_problem(model) == "the model runs eager attention, not sdpa"
    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(varlen, "_kernel", lambda: lambda q, k, v, cu_q, cu_k, max_q, max_k: q)  # a future signature
    assert "neither window_size nor is_causal" in varlen.varlen_problem(model)
    monkeypatch.setattr(varlen, "_kernel", lambda: None)
    assert "no varlen attention" in varlen.varlen_problem(model)


@pytest.mark.gpu
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_varlen_attention_matches_the_dense_mask_bf16_gpu(family, fixed, tiny_lora, fresh_dynamo):
    """torch's kernel on a packed row against sdpa with transformers' block-diagonal mask, compiled as trained.
    `fixed`: the row as a token budget packs it (a set length, bounds padded with empty examples)."""
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the device")
    results = []
    for use in (False, True):
        model = tiny_lora(family, 2, hidden_size=256, intermediate_size=704, rank=8, b_std=0.02, device="cuda",
                          dtype=torch.bfloat16)
        if family == "gemma3_text":  # a window the longer examples reach: the kernel's window against the mask's
            model.config.sliding_window = 128
            for m in model.modules():
                if getattr(m, "sliding_window", None):
                    m.sliding_window = 128
        examples = _examples(model.config.vocab_size, lengths=(300, 45, 700, 130))
        fast = fast_path(model, "cuda", packing=True, varlen_attention=use)
        assert ("varlen" in fast.describe()) == use, fast.describe()
        row = (pack_batch(examples, "cuda", length=1280, fixed_bounds=True) if fixed
               else pack_batch(examples, "cuda", multiple=64))
        results.append(_loss_and_grads(model, [row], fast))
    _assert_close(results[1], results[0], rtol=1e-2, grad_rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fixed", [False, True])
def test_a_packed_lfm2_row_bounded_and_compiled_matches_its_examples_alone_bf16_gpu(fixed, tiny_lora, fresh_dynamo):
    """LFM2 packed as `tunery train --packing` trains it on a GPU (varlen attention, convolutions bounded at each
    example's start, blocks compiled with inductor) against each example alone through transformers' own
    forward."""
    from tunery.models.packing import bound_convolutions

    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the device")
    model = tiny_lora("lfm2", 2, hidden_size=256, intermediate_size=704, rank=8, b_std=0.02, device="cuda",
                      dtype=torch.bfloat16)
    examples = _examples(model.config.vocab_size, lengths=(300, 45, 700, 130))
    alone = _loss_and_grads(model, [collate([t], 0, "cuda") for t in examples])
    fast = fast_path(model, "cuda", packing=True)
    assert "varlen" in fast.describe() and bound_convolutions(model) == 1, fast.describe()
    row = (pack_batch(examples, "cuda", length=1280, fixed_bounds=True, seq_idx=True) if fixed
           else pack_batch(examples, "cuda", multiple=64, seq_idx=True))
    _assert_close(_loss_and_grads(model, [row], fast), alone, rtol=1e-2, grad_rtol=5e-2)


def test_only_a_model_on_varlen_attention_gets_the_bounds():
    """A model's own forward may take no `doc_bounds` keyword (remote code): the loss passes them only to a model
    that runs varlen attention, whose packed rows need them."""
    from tunery.train.loss import summed_loss

    class Plain(torch.nn.Module):  # a forward with no **kwargs
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"_attn_implementation": "sdpa"})()
            self.emb = torch.nn.Embedding(50, 50)

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return type("Out", (), {"logits": self.emb(input_ids)})()

    model = Plain()
    batch = pack_batch(_examples(50), "cpu")
    assert "doc_bounds" in batch and float(summed_loss(model, batch)) > 0
    assert not varlen.reads_bounds(model)
    model.config._attn_implementation = varlen.NAME
    assert varlen.reads_bounds(model)
    with pytest.raises(TypeError, match="doc_bounds"):
        summed_loss(model, batch)


def test_captured_steps_read_each_rows_bounds(tiny_lora, monkeypatch):
    """A captured step replays with the bounds of the row it is given (a static input, like the tokens), not
    those it was captured with: rows of one shape whose examples differ, through the CPU stand-in of a graph."""
    from tunery.kernels.graphs import StepGraphs
    from tunery.kernels.options import StepState

    from .test_graphs import StandIn as GraphStandIn
    from .test_graphs import _train

    _with(monkeypatch, StandIn())
    a, b = tiny_lora("llama", 2), tiny_lora("llama", 2)
    for model in (a, b):
        assert varlen.use_varlen_attention(model)[0]
    eager = StepGraphs(list(a.parameters()), enabled=False, reason="reference")
    params, state = [p for p in b.parameters() if p.requires_grad], StepState()
    captured = StepGraphs(params, graph_cls=lambda pool: GraphStandIn(pool, params, state), state=state,
                          packed=True)  # packed rows, as the loop tells it with --packing
    vocab = a.config.vocab_size
    rows = [pack_batch(_examples(vocab, lengths), "cpu", multiple=32) for lengths in [(9, 3, 14), (4, 12, 10)] * 3]
    assert {r["input_ids"].shape for r in rows} == {(1, 32)} and rows[0]["doc_bounds"].tolist() == [0, 9, 12, 26, 32]
    steps = [[r] for r in rows]
    (want_losses, want_grads), (losses, grads) = _train(a, eager, steps), _train(b, captured, steps)
    assert captured._graphs and GraphStandIn.made[-1].replays >= 2
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for want, got in zip(want_grads, grads):
        for w, g in zip(want, got):
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)
