"""Packed micro-batches train exactly what the examples trained one by one would: no attention and no loss
crosses an example's boundary, for the reference forward and for the fused-loss fast path."""

from __future__ import annotations

import pytest
import torch

from tunery.data.tokenize import IGNORE, Tokenized
from tunery.models.lora import apply_lora
from tunery.models.tiny import FAMILIES, TinySpec, make_config, train_tokenizer
from tunery.train.batching import collate, pack_batch, packing_problem, trained_tokens
from tunery.train.loss import summed_loss

ATTENTION_ONLY = [f for f in FAMILIES if f != "lfm2"]  # LFM2 packs with its convolutions bounded: the last tests


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["hello world 123", "user", "assistant", "the quick brown fox"], vocab_size=300)


def _model(tokenizer, family: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    spec = TinySpec(family=family, hidden_size=32, intermediate_size=64, num_layers=2)
    base = AutoModelForCausalLM.from_config(make_config(spec, tokenizer), attn_implementation=attn)
    return apply_lora(base, 4, 8, 0.0).train()


def _examples(vocab: int, lengths=(9, 3, 14, 6), seed: int = 1) -> list[Tokenized]:
    """Examples of varied lengths whose prompts (first third) carry no loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [IGNORE] * (n // 3) + ids[n // 3 :], False))
    return out


def _loss_and_grads(model, batches: list[dict], fast=None):
    model.zero_grad(set_to_none=True)
    loss = sum(summed_loss(model, b, fast) for b in batches)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, ref):
    (got_loss, got_grads), (ref_loss, ref_grads) = got, ref
    assert torch.allclose(got_loss, ref_loss, rtol=1e-5), (float(got_loss), float(ref_loss))
    assert got_grads.keys() == ref_grads.keys() and got_grads
    for name, g in ref_grads.items():
        rel = float((got_grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 1e-5, (name, rel)


def test_pack_batch_restarts_positions_ignores_each_first_label_and_fills_the_tail():
    batch = [Tokenized([5, 6, 7], [IGNORE, 6, 7], False), Tokenized([8, 9], [8, 9], False)]
    packed = pack_batch(batch, "cpu")
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert "attention_mask" not in packed and packed["real_tokens"] == 5
    # the same tokens carry loss as when each example is padded on its own row
    assert trained_tokens(packed) == trained_tokens(collate(batch, 0, "cpu")) == 3
    rounded = pack_batch(batch, "cpu", multiple=8)
    assert rounded["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert rounded["labels"][0, 5:].tolist() == [IGNORE] * 3 and rounded["real_tokens"] == 5


@pytest.mark.parametrize("family, attn", [(f, a) for f in ATTENTION_ONLY for a in ("sdpa", "eager")
                                          if (f, a) != ("gemma2", "sdpa")])  # Gemma 2 runs eager attention only
def test_packed_loss_and_lora_grads_equal_each_example_alone(tokenizer, family, attn):
    model = _model(tokenizer, family, attn)
    if hasattr(model.config, "sliding_window"):  # a window the longest example reaches
        model.config.sliding_window = 5
    examples = _examples(len(tokenizer))
    alone = _loss_and_grads(model, [collate([t], tokenizer.pad_token_id, "cpu") for t in examples])
    _assert_same(_loss_and_grads(model, [pack_batch(examples, "cpu")]), alone)
    # the dummy tail a compiled model gets changes nothing either
    _assert_same(_loss_and_grads(model, [pack_batch(examples, "cpu", multiple=16)]), alone)


@pytest.mark.parametrize("family", ATTENTION_ONLY)
def test_packed_batch_through_the_fused_fast_path_equals_each_example_alone(tokenizer, family):
    from tests.fastpath import fast_path

    model = _model(tokenizer, family, "eager" if family == "gemma2" else "sdpa")
    if hasattr(model.config, "sliding_window"):  # a window the longest example reaches
        model.config.sliding_window = 5
    examples = _examples(len(tokenizer))
    alone = _loss_and_grads(model, [collate([t], tokenizer.pad_token_id, "cpu") for t in examples])
    fast = fast_path(model, "cpu", allow_cpu=True, compile=False)
    assert fast.applied
    _assert_same(_loss_and_grads(model, [pack_batch(examples, "cpu", multiple=16)], fast), alone)


def _second_losses(model, tokenizer, plain_causal: bool = False) -> tuple[float, float]:
    """The loss of one example packed after two different first examples (whose tokens carry no loss).
    `plain_causal`: without the positions, so transformers builds a mask that ignores the boundaries."""
    first, second = _examples(len(tokenizer), lengths=(12, 10))
    other_first = _examples(len(tokenizer), lengths=(12,), seed=7)[0]

    def second_loss(before: Tokenized) -> float:
        batch = pack_batch([Tokenized(before.input_ids, [IGNORE] * 12, False), second], "cpu")
        if plain_causal:
            batch.pop("position_ids")
        with torch.no_grad():
            return float(summed_loss(model, batch))

    return second_loss(first), second_loss(other_first)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_an_example_does_not_see_the_one_packed_before_it(tokenizer, attn):
    model = _model(tokenizer, "qwen2", attn).eval()
    after_first, after_other = _second_losses(model, tokenizer)
    assert after_first == pytest.approx(after_other, rel=1e-6, abs=0)
    # and the check has teeth: with a plain causal mask the second example's loss depends on the first
    after_first, after_other = _second_losses(model, tokenizer, plain_causal=True)
    assert after_first != pytest.approx(after_other, rel=1e-3)


def _bounded(model):
    from tunery.models.packing import bound_convolutions

    assert bound_convolutions(model) == 1  # the tiny LFM2's first block convolves, its second attends
    assert bound_convolutions(model) == 1  # asked again (setup, then a Trainer): still bounded, bounded once
    return model


def test_lfm2_convolutions_bounded_at_example_starts_train_each_example_as_if_alone(tokenizer):
    model = _model(tokenizer, "lfm2")
    examples = _examples(len(tokenizer))
    alone = _loss_and_grads(model, [collate([t], tokenizer.pad_token_id, "cpu") for t in examples])
    _bounded(model)
    _assert_same(_loss_and_grads(model, [pack_batch(examples, "cpu", seq_idx=True)]), alone)
    _assert_same(_loss_and_grads(model, [pack_batch(examples, "cpu", multiple=16, fixed_bounds=True,
                                                    seq_idx=True)]), alone)
    # padded rows (no seq_idx) still run transformers' own forward: the same as before bounding
    _assert_same(_loss_and_grads(model, [collate([t], tokenizer.pad_token_id, "cpu") for t in examples]), alone)


def test_a_packed_lfm2_row_through_the_fused_fast_path_equals_each_example_alone(tokenizer):
    from tests.fastpath import fast_path

    model = _model(tokenizer, "lfm2")
    examples = _examples(len(tokenizer))
    alone = _loss_and_grads(model, [collate([t], tokenizer.pad_token_id, "cpu") for t in examples])
    fast = fast_path(model, "cpu", allow_cpu=True, compile=False)
    assert fast.applied
    _bounded(model)
    _assert_same(_loss_and_grads(model, [pack_batch(examples, "cpu", multiple=16, seq_idx=True)], fast), alone)


def test_an_lfm2_example_does_not_see_the_one_packed_before_it_once_its_convolutions_are_bounded(tokenizer):
    from tunery.train.batching import SEQ_IDX

    model = _model(tokenizer, "lfm2").eval()
    assert packing_problem(model) is None  # its convolution is one tunery bounds
    # unbounded, transformers' convolution reads across the boundary (its fallback ignores seq_idx)
    after_first, after_other = _second_losses(model, tokenizer)
    assert after_first != pytest.approx(after_other, rel=1e-4)
    _bounded(model)
    first, second = _examples(len(tokenizer), lengths=(12, 10))
    other_first = _examples(len(tokenizer), lengths=(12,), seed=7)[0]
    losses = []
    for before in (first, other_first):
        batch = pack_batch([Tokenized(before.input_ids, [IGNORE] * 12, False), second], "cpu", seq_idx=True)
        assert batch[SEQ_IDX].tolist() == [[0] * 12 + [1] * 10]
        with torch.no_grad():
            losses.append(float(summed_loss(model, batch)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0)


def test_the_bounded_convolution_is_torchs_on_one_example_and_drops_only_taps_across_a_start():
    from tunery.models.packing import bounded_causal_conv

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 6, 9, generator=g), torch.randn(6, 1, 3, generator=g), torch.randn(6, generator=g)
    plain = torch.nn.functional.conv1d(x, w, b, padding=2, groups=6)[..., :9]
    one = torch.zeros(2, 9, dtype=torch.int32)
    assert torch.allclose(bounded_causal_conv(x, w, b, one), plain, atol=1e-6)
    # two examples in each row, the second starting at token 4: tokens 4 and 5 lose the taps reaching back
    two = torch.tensor([[0] * 4 + [1] * 5] * 2, dtype=torch.int32)
    got = bounded_causal_conv(x, w, b, two)
    assert torch.allclose(got[..., :4], plain[..., :4], atol=1e-6) and torch.allclose(got[..., 6:], plain[..., 6:],
                                                                                      atol=1e-6)
    second = torch.nn.functional.conv1d(x[..., 4:], w, b, padding=2, groups=6)[..., :5]
    assert torch.allclose(got[..., 4:], second, atol=1e-6)


def test_a_convolution_tunery_cannot_bound_is_still_refused():
    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3, padding=2)  # not depthwise, not LFM2's

    assert "Mixer" in packing_problem(torch.nn.Sequential(Mixer()))


def test_an_lfm2_run_trains_packed_with_its_convolutions_bounded(tmp_path, tunery_home):
    import json

    from tunery.config import RunConfig
    from tunery.models.tiny import build_tiny_model
    from tunery.train.loop import train

    rows = [{"prompt": f"say {i}", "completion": f"{i} {i}"} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_tiny_model(tmp_path / "m", [r["prompt"] + r["completion"] for r in rows],
                             TinySpec(family="lfm2", hidden_size=32, intermediate_size=64, num_layers=2))
    cfg = RunConfig(model=str(model), data=str(data), output_dir=str(tmp_path / "runs"), packing=True, max_steps=2,
                    device="cpu", name="r")
    run = train(cfg)
    assert (run / "adapter").is_dir()
    result = json.loads((run / "result.json").read_text())
    assert result["engine"]["batching"].startswith("packed rows (convolutions bounded at each example's start)")
    assert result["steps"] == 2

