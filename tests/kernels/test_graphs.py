"""kernels/graphs.py: a micro-batch's forward and backward captured per batch shape and replayed. On the CPU the
bookkeeping (static inputs, gradient buffers, accumulation, fallbacks) against eager steps, with a stand-in for
the CUDA graph that re-runs the captured function at each replay; on the GPU (pytest -m gpu) real captures of the
fast path (compiled blocks, offload, attention stash) against eager steps."""

from __future__ import annotations

import logging

import pytest
import torch

from tunery.kernels import graphs
from tunery.kernels.graphs import StepGraphs
from tunery.kernels.options import StepState
from tunery.models.tiny import FAMILIES


class StandIn:
    """What a CUDA graph does, on the CPU. Capture records the step and leaves every value as it was (the gradients
    a fresh backward allocates hold garbage, NaN here); `p.grad` then refers to the tensors the step writes. A replay
    computes the step again into exactly those tensors, whatever `p.grad` refers to at the time, and refreshes the
    static loss. `state`: the StepState of the StepGraphs that captures with it."""

    made: list[StandIn] = []

    def __init__(self, pool, params, state=None):
        self.params, self.fn, self.replays, self.out = params, None, 0, torch.zeros(())
        self.state = state
        StandIn.made.append(self)

    def capture(self, fn):
        self.fn, self.fresh = fn, all(p.grad is None for p in self.params)
        before = [None if p.grad is None else p.grad.clone() for p in self.params]
        fn()
        self.targets = [p.grad for p in self.params]
        for t, b in zip(self.targets, before):
            t.copy_(b) if b is not None else t.fill_(float("nan"))
        return self.out

    def replay(self):
        self.replays += 1
        refs = [p.grad for p in self.params]
        for p, t in zip(self.params, self.targets):
            p.grad = None if self.fresh else t
        self.out.copy_(self.fn())
        for p, t, r in zip(self.params, self.targets, refs):
            if p.grad is not t:
                t.copy_(p.grad)
            p.grad = r


class Broken(StandIn):
    def capture(self, fn):  # fails part-way through a recompute, as a real capture may
        self.state.recomputing = True
        raise RuntimeError("operation not permitted when stream is capturing")


def _batch(vocab, shape, seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100), "real_tokens": 9}


def _forward_backward(model, fast=None):
    """The micro-batch step train/loop.py's train_step hands its StepGraphs: the summed loss, its backward scaled
    by `scale` (gradients accumulate into p.grad), the loss."""
    from tunery.train.loss import summed_loss

    def forward_backward(batch, scale):
        loss = summed_loss(model, batch, fast)
        (loss * scale).backward()
        return loss.detach()

    return forward_backward


def _train(model, runner, batches_per_step, fast=None):
    """SGD steps over micro-batches, as train/loop.py runs them: (losses, grads of each step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    step = _forward_backward(model, fast)  # one function for the whole run, as a replay runs what was captured
    losses, grads = [], []
    for micro in batches_per_step:
        for b in micro:
            losses.append(float(runner(step, b, 1 / (len(micro) * b["input_ids"].numel()))))
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


@pytest.fixture
def pair(tiny_lora):
    """(eager runner, graph runner with the stand-in, its model, vocab size) over two identical tiny models;
    `limits`: the graph runner's capture_after / max_graphs."""

    def make(graph_cls=StandIn, **limits):
        StandIn.made.clear()
        a, b = tiny_lora("llama", 2), tiny_lora("llama", 2)
        eager = StepGraphs(list(a.parameters()), enabled=False, reason="reference")
        params, state = [p for p in b.parameters() if p.requires_grad], StepState()
        captured = StepGraphs(params, graph_cls=lambda pool: graph_cls(pool, params, state), state=state, **limits)
        return (a, eager), (b, captured), a.config.vocab_size

    return make


def test_replays_match_eager_steps_with_accumulation_and_new_shapes(pair):
    (a, eager), (b, captured), vocab = pair()
    # two micro-batches per step: the first finds no gradients, the second adds to them, so each shape gets two
    # graphs, captured from its third micro-batch on
    shapes = [(2, 8), (2, 8), (2, 8), (2, 8), (2, 12), (2, 12), (2, 12), (2, 8)]
    steps = [[_batch(vocab, s, seed=10 * i + j) for j in range(2)] for i, s in enumerate(shapes)]
    want_loss, want_grads = _train(a, eager, steps)
    got_loss, got_grads = _train(b, captured, steps)
    assert len(StandIn.made) == 4 and sum(g.replays for g in StandIn.made) == 16 - 2 * captured.capture_after
    assert torch.allclose(torch.tensor(got_loss), torch.tensor(want_loss), rtol=1e-5)
    for want, got in zip(want_grads, got_grads):
        for w, g in zip(want, got):
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_a_gradient_left_by_an_eager_step_is_carried_into_the_replay(pair):
    (a, eager), (b, captured), vocab = pair()
    step_a, step_b = _forward_backward(a), _forward_backward(b)
    for i in range(3):  # the shape is captured
        captured(step_b, _batch(vocab, (2, 8), seed=i), 1.0)
        b.zero_grad(set_to_none=True)
    # one optimizer step: an eager micro-batch of another shape, then a replay, accumulating
    first, second = _batch(vocab, (2, 6), seed=7), _batch(vocab, (2, 8), seed=8)
    captured(step_b, first, 0.5)
    captured(step_b, second, 0.25)
    eager(step_a, first, 0.5)
    eager(step_a, second, 0.25)
    assert [g.replays for g in StandIn.made] == [1, 1]  # the fresh graph, then the adding one
    for p, q in zip(a.parameters(), b.parameters()):
        if p.requires_grad:
            assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6)


def _eager_then_captured(model, inputs: dict, monkeypatch, packed: bool) -> dict:
    """One forward eagerly, then one under `capture_context` with transformers told a stream capture is on, as it
    is in a real one (its mask code then decides as for a traced graph): each forward's logits and, per sdpa
    call, whether it was given a mask; whether the StepState's `in_capture()` held inside; and that state."""
    from transformers.utils import import_utils

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    want = model(**inputs, use_cache=False).logits
    eager_calls, calls[:] = list(calls), []
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
    state = StepState()
    with graphs.capture_context(state, packed=packed):
        got = model(**inputs, use_cache=False).logits
        inside = state.in_capture()
    return {"want": want, "got": got, "eager_calls": eager_calls, "captured_calls": calls, "capturing": inside,
            "state": state}


@pytest.mark.parametrize("family, window, batch", [
    ("llama", None, "plain"), ("llama", None, "padded"), ("llama", None, "packed"),
    ("mistral", 5, "plain"),  # a sliding window the sequence reaches: sdpa needs the mask
    ("gemma2", 5, "plain"),  # eager attention (Gemma 2's default): no mask would mean no masking at all
])
def test_a_capture_sees_the_masks_an_eager_step_sees(tiny_lora, monkeypatch, family, window, batch):
    """Under `capture_context` the model computes what it computes eagerly: sdpa's builder skips only the masks
    an eager step skips, a batch without position ids is not read as packed, and the other builders are
    untouched (`_eager_then_captured`)."""
    model = tiny_lora(family, 2)
    if window:
        model.config.sliding_window = window
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    if batch == "padded":
        inputs["attention_mask"] = torch.ones_like(ids).index_fill_(1, torch.arange(9, 12), 0)
    if batch == "packed":
        inputs = {"input_ids": ids[:1], "position_ids": torch.tensor([[*range(5), *range(7)]])}
    run = _eager_then_captured(model, inputs, monkeypatch, packed=batch == "packed")
    eager_calls = run["eager_calls"]
    assert run["capturing"]
    assert torch.allclose(run["got"], run["want"], atol=1e-6)
    # a mask exactly where the eager step had one (else the blocks would recompile)
    assert run["captured_calls"] == eager_calls
    assert eager_calls == ([] if family == "gemma2" else [window is not None or batch != "plain"] * 2)
    assert not run["state"].in_capture()


@pytest.mark.parametrize("batch", ["plain", "packed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_under_a_capture_gets_the_masks_of_its_eager_step(tiny_lora, monkeypatch, family, batch):
    """Each family's own mask code (sliding windows, hybrid layers) under a simulated stream capture: attention
    is given a mask exactly where the eager forward gave one, so the captured blocks need no recompile."""
    model = tiny_lora(family, 2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    if batch == "packed":
        inputs = {"input_ids": ids[:1], "position_ids": torch.tensor([[*range(5), *range(7)]])}
    run = _eager_then_captured(model, inputs, monkeypatch, packed=batch == "packed")
    eager_calls = run["eager_calls"]
    assert torch.allclose(run["got"], run["want"], atol=1e-5)
    assert run["captured_calls"] == eager_calls
    if eager_calls and batch == "plain":  # sdpa families: causal, no mask built
        assert not any(eager_calls)


def test_under_a_capture_sdpa_builds_a_mask_only_where_eager_would():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    def build(**extra):
        return masks["sdpa"](**{"batch_size": 1, "q_length": 8, "kv_length": 8, "device": "cpu",
                                "mask_function": causal_mask_function, **extra})

    window = {"mask_function": sliding_window_causal_mask_function(4), "local_size": 4}
    with graphs.capture_context(StepState()):
        assert build() is None
        assert masks["sdpa"](1, 8, 8, device="cpu") is None  # positional arguments bind the same way
        kept = build(**window), build(allow_is_causal_skip=False)
    assert torch.equal(kept[0], build(**window)) and not bool(kept[0][0, 0, 7, 0])  # the window masks key 0
    assert torch.equal(kept[1], torch.ones(8, 8, dtype=torch.bool).tril()[None, None])


def test_a_failed_capture_falls_back_to_eager_for_the_run(pair, caplog):
    (a, eager), (b, captured), vocab = pair(Broken)
    steps = [[_batch(vocab, (2, 8), seed=i)] for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="tunery.kernels.graphs"):
        got_loss, got_grads = _train(b, captured, steps)
    want_loss, want_grads = _train(a, eager, steps)
    assert not captured.enabled and "operation not permitted" in captured.reason and not captured.state.recomputing
    assert "CUDA graphs off" in caplog.text
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-6) for gs, ws in zip(got_grads, want_grads)
               for g, w in zip(gs, ws))


def test_a_failed_capture_leaves_grouped_adapter_slots_to_the_eager_step(tiny_lora):
    """A capture computes nothing, so the adapter slots of kernels/lora_group.py, refreshed at each forward after
    an optimizer step, must not count as refreshed by a capture: the eager step after a failed one would run on
    the adapters from before the last update (on the GPU: a 7.8% higher loss at the step that tried)."""
    from tunery.kernels.lora import fuse_lora
    from tunery.kernels.lora_group import group_lora
    from tunery.models.catalog import family_of

    def grouped():  # (model, the StepState its LoRA layers share, as fast_path_for builds them)
        model, state = tiny_lora("llama", 2), StepState()
        fuse_lora(model, state=state)
        assert group_lora(model, family_of("llama").lora_groups, model.get_base_model().model, state=state)[0]
        return model, state

    (a, _), (b, state) = grouped(), grouped()
    slots = [m._tunery_group[0].s for m in b.modules() if hasattr(m, "_tunery_group")]

    class Unrun(StandIn):
        def capture(self, fn):  # queues the step (the forward's refresh too), computes none of it, and fails
            before = [s.clone() for s in slots]
            fn()
            for s, v in zip(slots, before):
                s.copy_(v)
            raise RuntimeError("capture failed after the forward")

    eager = StepGraphs(list(a.parameters()), enabled=False, reason="reference")
    params = [p for p in b.parameters() if p.requires_grad]
    captured = StepGraphs(params, graph_cls=lambda pool: Unrun(pool, params, state), state=state)
    vocab = a.config.vocab_size
    steps = [[_batch(vocab, (2, 8), seed=i)] for i in range(5)]
    got_loss, got_grads = _train(b, captured, steps)
    want_loss, want_grads = _train(a, eager, steps)
    assert not captured.enabled and "capture failed after the forward" in captured.reason
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-6) for gs, ws in zip(got_grads, want_grads)
               for g, w in zip(gs, ws))


def test_shapes_past_the_limit_stay_eager(pair):
    (a, eager), (b, captured), vocab = pair(max_graphs=1)
    step = _forward_backward(b)
    for seq in (8, 12):
        for i in range(4):
            captured(step, _batch(vocab, (2, seq), seed=i), 1.0)
    assert len(StandIn.made) == 1 and StandIn.made[0].replays == 2


def test_graphs_only_where_the_model_draws_no_random_numbers(tiny_lora):
    from tunery.kernels.offload import draws_random

    assert not draws_random(tiny_lora("llama", 2, dropout=0.0))
    assert draws_random(tiny_lora("llama", 2, dropout=0.1))
    model = tiny_lora("llama", 2, dropout=0.0)
    model.config.attention_dropout = 0.1
    assert draws_random(model)
    assert graphs.graphs_reason(model, "cpu", None) == "CPU"


def test_the_host_pool_reuses_its_buffers():
    from tunery.kernels.offload import HostPool

    pool = HostPool(pin=False)
    a = pool.take(100)
    assert a.numel() == 100 and pool.held == 100
    pool.give(a)
    assert pool.take(100) is a
    pool.give(a)
    assert pool.take(60) is a and pool.held == 100  # a larger free buffer serves a smaller request
    b = pool.take(60)  # none free: a new one
    assert b is not a and pool.held == 160


@pytest.mark.gpu
@pytest.mark.parametrize("quant, packed", [("", False), ("4bit", False), ("", True)])
def test_captured_fast_path_matches_eager_gpu(tmp_path, quant, packed):
    """The real thing: compiled blocks, offloaded inputs, the attention stash through pinned memory (16-bit),
    captured and replayed, against the same model stepping eagerly; both bf16 on the GPU, on padded batches, or
    on packed rows through varlen attention whose example bounds change from replay to replay."""
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the device (pytest -m gpu)")
    from tests.fastpath import fast_path
    from tunery.config import RunConfig
    from tunery.data.tokenize import Tokenized
    from tunery.models.load import load_model
    from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of
    from tunery.train.batching import collate, pack_batch
    from tunery.train.loop import make_trainable, step_graphs

    options = dict(stash_max_bytes_per_gflop=float("inf"),  # the tiny model would not stash
                   offload_keep_bytes=0)  # and its tensors would all stay on the GPU
    data = [{"text": "a b c d e f g h"}]
    folder = build_tiny_model(tmp_path / "m", corpus_of(data),
                              TinySpec(family="llama", hidden_size=256, intermediate_size=768, num_layers=4))
    cfg = RunConfig(model=str(folder), data="-", method="qlora" if quant else "lora", lora_dropout=0.0,
                    gradient_checkpointing=True)
    runs = {}
    for capture in (False, True):
        torch.manual_seed(0)
        model = make_trainable(load_model(str(folder), "cuda", torch.bfloat16, four_bit=bool(quant)), cfg)
        fast = fast_path(model, "cuda", packing=packed, cuda_graphs=capture, **options)  # off: the eager reference
        assert ("varlen" in fast.describe()) == packed, fast.describe()
        runner = step_graphs(model, fast, "cuda", packed=packed)
        assert runner.enabled == capture, runner.reason
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(1)

        lengths = iter([(128, 97, 64), (100, 125, 64)] * 8)  # packed: one row shape, other bounds each time

        def micro(vocab=vocab, g=g, lengths=lengths) -> dict:  # as train/loop.py builds them for the fast path
            if packed:
                rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in next(lengths)]
                return pack_batch([Tokenized(r, r, False) for r in rows], "cuda", multiple=64)
            rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (128, 97)]
            return collate([Tokenized(r, r, False) for r in rows], 0, "cuda", multiple=64, mask=False)

        steps = [[micro() for _ in range(2)] for _ in range(4)]
        runs[capture] = _train(model, runner, steps, fast)
        if capture:
            assert len(runner._graphs) == 2 and runner.enabled, runner.reason  # fresh and adding
        fast.remove()
    (want_loss, want_grads), (got_loss, got_grads) = runs[False], runs[True]
    assert got_loss == pytest.approx(want_loss, rel=1e-3)
    for want, got in zip(want_grads, got_grads):
        for w, g in zip(want, got):
            assert (g.float() - w.float()).norm() <= 1e-2 * w.float().norm() + 1e-6
