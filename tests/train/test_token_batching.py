"""Micro-batches cut by token budget (`micro_batch_tokens`): every example once, few shapes, the same step."""

from __future__ import annotations

import random

import pytest

from tests.train.test_units import _trainer, tiny  # noqa: F401  (the module fixture of a tiny model and data)
from tunery.data.tokenize import IGNORE, Tokenized
from tunery.train import loop
from tunery.train.batching import bucket, pack_batch, row_length, step_examples, token_micro_batches
from tunery.train.loop import train_step


def _examples(n: int, seed: int = 0) -> list[Tokenized]:
    rng = random.Random(seed)
    lengths = [min(2000, max(2, int(rng.lognormvariate(5.7, 0.8)))) for _ in range(n)]  # median ~300, cap 2k
    return [Tokenized(list(range(i, i + n)), [IGNORE] + list(range(i + 1, i + n)), False)
            for i, n in enumerate(lengths)]


def test_the_ladder_holds_every_length_with_at_most_a_quarter_of_padding_and_few_shapes():
    lengths = range(1, 16385)
    assert all(bucket(n) >= n for n in lengths)
    assert all(bucket(n) - n < 64 or bucket(n) - n <= n // 4 for n in lengths)
    assert all(bucket(n) % 64 == 0 for n in lengths)
    assert len({bucket(n) for n in lengths}) <= 30  # a multiple of 64 each would be 256 shapes
    assert bucket(bucket(1000)) == bucket(1000)  # a ladder length is its own bucket


@pytest.mark.parametrize("packed", [False, True])
def test_each_epoch_trains_every_example_exactly_once_within_the_budget(packed):
    data = _examples(300)
    per_step, budget = 16, 4096
    seen = []
    for step in range(len(data) // per_step):
        picked = [data[i] for i in step_examples(len(data), step, per_step, seed=1)]
        micro = token_micro_batches(picked, budget, packed)
        assert sorted(id(t) for m in micro for t in m) == sorted(id(t) for t in picked)  # the step's, once each
        for m in micro:
            longest = max(len(t.input_ids) for t in m)
            size = sum(len(t.input_ids) for t in m) if packed else len(m) * bucket(longest)
            assert size <= budget or len(m) == 1
        seen += [id(t) for m in micro for t in m]
    assert len(seen) == len(set(seen)) == per_step * (len(data) // per_step)
    again = token_micro_batches([data[i] for i in step_examples(len(data), 3, per_step, 1)], budget, packed)
    first = token_micro_batches([data[i] for i in step_examples(len(data), 3, per_step, 1)], budget, packed)
    assert [[id(t) for t in m] for m in again] == [[id(t) for t in m] for m in first]  # resume rebuilds it


def test_a_run_of_varied_lengths_meets_few_shapes():
    data = _examples(2000, seed=2)
    padded, packed = set(), set()
    for step in range(len(data) // 8):
        picked = [data[i] for i in step_examples(len(data), step, 8, seed=0)]
        for m in token_micro_batches(picked, 8192, packed=False):
            padded.add((len(m), bucket(max(len(t.input_ids) for t in m))))
        for m in token_micro_batches(picked, 8192, packed=True):
            row = pack_batch(m, "cpu", length=row_length(sum(len(t.input_ids) for t in m), 8192), fixed_bounds=True)
            packed.add((tuple(row["input_ids"].shape), tuple(row["doc_bounds"].shape)))
    lengths = {length for _, length in padded}
    assert len(lengths) <= 24, lengths
    assert len(packed) <= 60, packed  # row lengths from the ladder, example counts in powers of two


def test_fixed_bounds_pad_with_empty_examples_at_the_end():
    batch = [Tokenized([1, 2, 3], [IGNORE, 2, 3], False), Tokenized([4, 5], [IGNORE, 5], False)]
    row = pack_batch(batch, "cpu", length=8, fixed_bounds=True)
    assert row["input_ids"].shape == (1, 8)
    assert row["doc_bounds"].tolist() == [0, 3, 5, 8, 8, 8, 8, 8]  # the tail (5..8) its own example, then empty
    assert row["real_tokens"] == 5 and row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


@pytest.mark.parametrize("packing", [False, True])
def test_a_token_budget_step_equals_the_example_count_step(tiny, monkeypatch, packing):  # noqa: F811
    """Same examples per optimizer step, cut differently: the same loss (mean over the step's trained
    tokens), the same real tokens and the same update."""
    by_count = _trainer(tiny, monkeypatch, batch_size=4, grad_accum=2)
    by_tokens = _trainer(tiny, monkeypatch, batch_size=4, grad_accum=2, packing=packing, micro_batch_tokens=48)
    a = train_step(by_count, 0)
    calls = []  # the shape of each micro-batch the token-budget trainer computes a loss for
    seen = loop.summed_loss

    def spy(model, batch, path=None):
        if model is by_tokens.forward_model:
            calls.append(tuple(batch["input_ids"].shape))
        return seen(model, batch, path)

    monkeypatch.setattr(loop, "summed_loss", spy)
    b = train_step(by_tokens, 0)
    assert len(calls) != 2  # cut by tokens, not into grad_accum micro-batches of 4
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["tokens"] == a["tokens"]
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for (na, pa), (nb, pb) in zip(by_count.model.named_parameters(), by_tokens.model.named_parameters()):
        if pa.requires_grad:
            assert nb == na and (pa - pb).abs().max() < 1e-5, na


def test_a_token_budget_is_one_process_only():
    from tunery.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        RunConfig(model="m", data="d", micro_batch_tokens=4096, gpus=2).validate()


def test_a_gpu_run_cuts_by_tokens_and_packs_where_the_model_can(tiny, monkeypatch):  # noqa: F811
    """Unset, packing and micro_batch_tokens are chosen: on CUDA with the fast path in one process, token budgets
    and packed rows (padded ones for a model that cannot pack); elsewhere batch_size examples, padded, as before."""
    from tests.train.test_packing import _model
    from tunery.kernels import varlen
    from tunery.train.distributed import Dist
    from tunery.train.loop import Batching, choose_batching

    t = _trainer(tiny, monkeypatch)
    cfg, model = t.cfg, t.model
    assert cfg.packing is None and cfg.micro_batch_tokens is None
    assert t.batching == Batching(False, 0, ()) == choose_batching(cfg, model, "cpu", Dist())  # the CPU: as before
    assert choose_batching(cfg, model, "cuda", Dist()) == Batching(False, 4096, ("no packing", "micro_batch_tokens "
                                                                                 "4096"))  # no varlen kernel here
    monkeypatch.setattr(varlen, "varlen_problem", lambda m: None)  # as a 16-bit model on a GPU with torch >= 2.9
    gpu = choose_batching(cfg, model, "cuda", Dist())
    assert gpu.packed and gpu.tokens == 4096 and "packed rows, micro-batches of up to 4,096 tokens" in gpu.describe()
    assert choose_batching(cfg.replace(max_seq_len=8192), model, "cuda", Dist()).tokens == 8192
    assert choose_batching(cfg.replace(packing=False, micro_batch_tokens=0), model, "cuda", Dist()) == Batching(
        False, 0, ())  # what the user set is kept
    assert choose_batching(cfg.replace(fast=False), model, "cuda", Dist()) == Batching(False, 0, ())
    assert choose_batching(cfg, model, "cuda", Dist(world=2)) == Batching(False, 0, ())  # several processes
    lfm2 = choose_batching(cfg, _model(t.tokenizer, "lfm2"), "cuda", Dist())
    assert not lfm2.packed and not lfm2.seq_idx and lfm2.tokens == 4096  # not by default until measured on a GPU
    asked = choose_batching(cfg.replace(packing=True), _model(t.tokenizer, "lfm2"), "cuda", Dist())
    assert asked.packed and asked.seq_idx and "convolutions bounded" in asked.describe()  # --packing: bounded


def test_a_gpu_run_compiles_only_when_its_steps_repay_the_warm_up(tiny, monkeypatch):  # noqa: F811
    """Unset, torch.compile is decided by the run's length: the steps' time estimated for this GPU (the advisor's
    throughput for an H100 here) against compile_min_seconds. Set, or off the GPU fast path, it is kept."""
    from tunery.jobs import flavors
    from tunery.train.distributed import Dist
    from tunery.train.loop import choose_compile, estimated_step_seconds

    monkeypatch.setattr(flavors, "local_flavor", lambda: flavors.flavors()["h100"])
    t = _trainer(tiny, monkeypatch)
    cfg, model, data, batching = t.cfg, t.model, t.data, t.batching
    assert cfg.fast_path.compile is None
    short = estimated_step_seconds(cfg, model, data, batching, 3)
    long = estimated_step_seconds(cfg, model, data, batching, 3000)
    assert 0 < short and long == pytest.approx(1000 * short)  # the tokens of 1,000 times the steps
    options, note = choose_compile(cfg, model, data, "cuda", Dist(), batching, 3)
    assert options.compile is False and note.startswith("torch.compile off: steps estimated at ~0 s")
    assert "under compile_min_seconds 10" in note
    edge = cfg.replace(fast_path={"compile_min_seconds": short})  # at least the threshold: compiled
    options, note = choose_compile(edge, model, data, "cuda", Dist(), batching, 3)
    assert options.compile is True and note.startswith("torch.compile on")
    assert options.compile_min_seconds == short and options.cuda_graphs  # the other options are kept
    for kept in (cfg.replace(fast_path={"compile": False}), cfg.replace(fast_path={"compile": True})):
        assert choose_compile(kept, model, data, "cuda", Dist(), batching, 3) == (kept.fast_path, "")
    off_the_fast_path = (("cpu", Dist(), cfg), ("cuda", Dist(world=2), cfg), ("cuda", Dist(), cfg.replace(fast=False)))
    for device, dist, c in off_the_fast_path:
        assert choose_compile(c, model, data, device, dist, batching, 3) == (c.fast_path, "")


def test_an_unset_compile_compiles_outside_the_training_loop(tiny, monkeypatch):  # noqa: F811
    """The kernels' own default (benchmarks, tests): unset is on; only the training loop decides it per run."""
    from tests.fastpath import fast_path

    t = _trainer(tiny, monkeypatch)
    assert fast_path(t.model, "cpu", allow_cpu=True, compile_backend="aot_eager").compiled
    assert not fast_path(t.model, "cpu", allow_cpu=True, compile=False).compiled


@pytest.mark.parametrize("packing", [False, True])
def test_the_next_steps_batches_are_built_while_a_step_runs(tiny, monkeypatch, packing):  # noqa: F811
    """Each step leaves the next one's micro-batches built (the same as building them then), none after the
    last; their trained-token counts are taken on the host and equal the labels' own count."""
    import torch

    from tunery.train.batching import TRAINED, trained_tokens
    from tunery.train.loop import step_batches

    t = _trainer(tiny, monkeypatch, packing=packing, micro_batch_tokens=64, batch_size=8)
    for step in range(3):
        train_step(t, step)
        if step == 2:
            assert t.prefetched == {}
            continue
        assert set(t.prefetched) == {step + 1}
        built, fresh = t.prefetched[step + 1], step_batches(t, step + 1)
        assert len(built) == len(fresh) > 1
        for a, b in zip(built, fresh):
            assert a.keys() == b.keys() and TRAINED in a
            for k in a:
                assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
            assert trained_tokens(a) == trained_tokens({k: v for k, v in a.items() if k != TRAINED}) > 0
