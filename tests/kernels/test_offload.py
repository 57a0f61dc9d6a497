"""Offloaded checkpointing gives the gradients of no checkpointing and of torch's checkpoint, dropout included."""

from __future__ import annotations

import pytest
import torch

from tunery.kernels.offload import enable_offload
from tunery.kernels.options import FastPathOptions, StepState


def _grads(model, ids):
    torch.manual_seed(3)  # same dropout masks each run; the recompute must redraw them identically
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _offload(model, **options):
    """enable_offload with these FastPathOptions (the attention stash off unless told) and a fresh StepState."""
    return enable_offload(model, FastPathOptions(**{"stash_attention": False, **options}), StepState())


def test_offloaded_checkpointing_matches_plain_and_undoes(tiny_lora, tiny_tokenizer):
    model = tiny_lora("qwen2", num_layers=3, dropout=0.3)
    model.train()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 13))
    ref_loss, ref = _grads(model, ids)
    assert _offload(model) == ([], [])  # nothing checkpointed: nothing to offload
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    _, plain = _grads(model, ids)
    done, undo = _offload(model)
    assert done == ["checkpointing with block inputs offloaded to pinned CPU memory x3"]
    for _ in range(2):  # twice: the offloader's bookkeeping is clean after each backward
        loss, got = _grads(model, ids)
        assert torch.allclose(loss, ref_loss)
        for name, g in ref.items():
            assert torch.allclose(got[name], g, atol=1e-6), name
            assert torch.allclose(plain[name], g, atol=1e-6), name
    for fn in undo:
        fn()
    assert all(getattr(m, "_gradient_checkpointing_func", None) is not None
               and "offloaded" not in repr(m._gradient_checkpointing_func)
               for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))


@pytest.mark.parametrize("output_fetch", ["block", "attention"])
def test_stashed_attention_matches_plain_runs_once_and_falls_back(tiny_lora, tiny_tokenizer, monkeypatch,
                                                                  output_fetch):
    """Attention kept from forward, not recomputed: the gradients of no checkpointing (dropout included, so the
    recompute's MLP draws the forward's masks), each sublayer run once a step with its saved tensors copied out,
    and when the stash would not fit the host's memory, the recompute as before with the same gradients."""
    from tunery.kernels import offload

    options = FastPathOptions(stash_attention=True,
                              offload_keep_bytes=0,  # tiny tensors too go through the host copies
                              stash_max_bytes_per_gflop=float("inf"),  # tiny blocks are all link
                              output_fetch=output_fetch,
                              last_block_on_gpu=False)  # every block copies out (the last one: below)
    model, ids, ref_loss, ref, (done, undo) = _three_offloaded_blocks(tiny_lora, tiny_tokenizer, options)
    assert done[1] == "attention kept for backward in pinned CPU memory, not recomputed x3"
    attentions = [layer.self_attn for layer in model.base_model.model.model.layers]
    calls, copies = [], []
    monkeypatch.setattr(type(attentions[0]), "forward", _counting(type(attentions[0]).forward, calls))
    keep = offload._AttentionStash.keep_graph
    monkeypatch.setattr(offload._AttentionStash, "keep_graph",
                        lambda self, *a: keep(self, *a) + (copies.append(len(self.host)) or ()))
    for fraction, runs in ((options.stash_host_fraction, 3), (0.0, 6)):  # kept; then too big: recomputed
        options.stash_host_fraction = fraction  # the offloader reads its options at each block
        for _ in range(2):  # twice: nothing of one step's stash leaks into the next
            calls.clear()
            loss, got = _grads(model, ids)
            assert torch.allclose(loss, ref_loss)
            for name, g in ref.items():
                assert torch.allclose(got[name], g, atol=1e-6), name
            assert len(calls) == runs
    assert len(copies) == 6 and min(copies) >= 4  # q, k, v, attention out, ... each copied once per step
    for fn in undo:
        fn()
    assert all("forward" not in vars(a) for a in attentions)


@pytest.mark.parametrize("stash, max_tokens", [(True, 8192), (False, 8192), (True, 25)])
def test_last_block_keeps_its_input_and_stash_on_the_device(tiny_lora, tiny_tokenizer, monkeypatch, stash,
                                                            max_tokens):
    """The forward's last block keeps its input (the tensor itself, no copy) and its attention stash (every saved
    tensor by reference) where they are, unless the input holds more tokens than the limit (here 2 x 13); the
    blocks before it copy theirs out. No checkpointing's gradients (dropout included), each step."""
    from tunery.kernels import offload

    on_device = max_tokens >= 2 * 13
    options = FastPathOptions(stash_attention=stash, last_block_on_gpu_max_tokens=max_tokens,
                              stash_max_bytes_per_gflop=float("inf"),
                              offload_keep_bytes=0)  # tiny tensors too go through the host copies
    model, ids, ref_loss, ref, _ = _three_offloaded_blocks(tiny_lora, tiny_tokenizer, options)
    inputs, slots = [], []
    for layer in model.base_model.model.model.layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(kwargs.get("hidden_states", args[0] if
                                                                                          args else None)),
                                        with_kwargs=True)
    slot_init = offload._Slot.__init__
    def recording_init(self, *args):  # where each slot's copy of its input lives when made
        slot_init(self, *args)
        slots.append((self.fetched if self.host is None else self.host).data_ptr())

    monkeypatch.setattr(offload._Slot, "__init__", recording_init)
    stashes = []  # how many storages each kept sublayer copied to the host
    keep = offload._AttentionStash.keep_graph
    monkeypatch.setattr(offload._AttentionStash, "keep_graph",
                        lambda self, *a: keep(self, *a) + (stashes.append(len(self.host)) or ()))
    for _ in range(2):  # twice: which block is last is counted afresh each step
        inputs.clear(), slots.clear(), stashes.clear()
        loss, got = _grads(model, ids)
        assert torch.allclose(loss, ref_loss)
        for name, g in ref.items():
            assert torch.allclose(got[name], g, atol=1e-6), name
        assert len(slots) == len(inputs) == 3
        shared = [address == x.data_ptr() for address, x in zip(slots, inputs)]
        assert shared == [False, False, on_device]
        assert stashes == ([stashes[0], stashes[0], 0 if on_device else stashes[0]] if stash else [])
        assert not stash or stashes[0] >= 4


def _three_offloaded_blocks(tiny_lora, tiny_tokenizer, options: FastPathOptions):
    """A 3-block Llama with dropout, its loss and gradients without checkpointing, then offloaded checkpointing
    on with `options`: (model, ids, loss, grads, what enable_offload returned)."""
    model = tiny_lora("llama", num_layers=3, dropout=0.3)
    model.train()
    ids = torch.randint(0, len(tiny_tokenizer), (2, 13))
    ref_loss, ref = _grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model, ids, ref_loss, ref, enable_offload(model, options, StepState())


def _counting(forward, calls):
    def run(self, *args, **kwargs):
        calls.append(self.layer_idx)
        return forward(self, *args, **kwargs)
    return run


def test_attention_with_four_bit_weights_is_recomputed(tiny_lora, monkeypatch):
    """A sublayer with 4-bit weights keeps the recompute (the stash measured slower with them)."""
    model = tiny_lora("llama", num_layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert len(_offload(model, stash_attention=True, stash_max_bytes_per_gflop=float("inf"))[0]) == 2
    weight = model.base_model.model.model.layers[1].self_attn.v_proj.base_layer.weight
    monkeypatch.setattr(weight, "quant_state", object(), raising=False)  # what bitsandbytes' Params4bit carries
    done, _ = _offload(model, stash_attention=True, stash_max_bytes_per_gflop=float("inf"))
    assert done[1:] == ["attention recomputed (4-bit weights: slower with the stash on Llama-3.1-8B "
                        "(docs/benchmarks-history.md))"]


def test_four_bit_weights_count_by_their_dense_shape():
    """The stash's cost estimates count a packed 4-bit weight (half a byte a weight) as the weights it holds."""
    import bitsandbytes as bnb

    from tunery.kernels.offload import _linear_weights

    block = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(48, 32, bias=False))
    assert _linear_weights(block) == 2 * 48 * 32
    block[0].weight = bnb.nn.Params4bit(data=torch.randn(48, 32), requires_grad=False, quant_type="nf4").to("cpu")
    assert block[0].weight.numel() < 48 * 32 and _linear_weights(block) == 2 * 48 * 32


@pytest.mark.parametrize("arch, kb, share, stashed", [
    ("llama-8b", 84.5, 0.193, True), ("qwen-7b", 65.9, 0.126, False), ("llama-1b", 151.5, 0.172, False),
    ("qwen-0.5b", 257.6, 0.123, False), ("phi3.5-mini", 162.8, 0.333, False)])  # Phi-3: q/k/v in one linear
def test_stash_only_where_the_host_link_keeps_up_and_attention_weighs(arch, kb, share, stashed):
    """The stash moves per token about four block inputs over the host link; blocks whose matmuls are too small
    for that (per GFLOP), or whose attention is a small share of their weights, keep the recompute. Checked on
    the real layer shapes, built on the meta device."""
    import transformers

    from tunery.kernels import offload

    h, inter, heads, kv = {"llama-8b": (4096, 14336, 32, 8), "qwen-7b": (3584, 18944, 28, 4),
                           "llama-1b": (2048, 8192, 32, 8), "qwen-0.5b": (896, 4864, 14, 2),
                           "phi3.5-mini": (3072, 8192, 32, 32)}[arch]
    family = {"qwen": transformers.Qwen2Config, "phi3": transformers.Phi3Config}.get(arch[:4], transformers.LlamaConfig)
    cfg = family(hidden_size=h, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                 num_hidden_layers=1)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    layer = model.model.layers[0]
    assert abs(offload._link_bytes_per_gflop(layer) / 1e3 - kb) < 0.1
    assert abs(offload._attention_share(layer) - share) < 1e-3
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    done, _ = _offload(model, stash_attention=True)
    assert any("attention kept" in d for d in done) == stashed
    if not stashed:  # the run says why
        assert done[1].startswith("attention recomputed (") and ("kB per GFLOP" in done[1]) == (kb > 100)
