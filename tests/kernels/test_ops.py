"""liger RMSNorm/SwiGLU swaps against the modules they replace, on the GPU (run on the device: pytest -m gpu), and
the compiled blocks against PEFT's uncompiled forward without checkpointing (CPU with aot_eager; GPU with inductor)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.fastpath import fast_path

from .conftest import GraphLog


def _model(family: str, num_layers: int = 2):
    import transformers

    from tunery.models.lora import apply_lora

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    cfg = cls(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=num_layers,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = apply_lora(model, 8, 16, 0.0)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so its gradients mean something
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _loss_and_grads(model, fast, batch):
    from tunery.train.loss import summed_loss

    model.zero_grad(set_to_none=True)
    loss = summed_loss(model, batch, fast)
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_swapped_ops_match_the_reference_modules(family):
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the device")
    model = _model(family)
    ids = torch.randint(0, 1000, (2, 128), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ref_loss, ref_grads = _loss_and_grads(model, None, batch)
    fast = fast_path(model, "cuda", liger_ops=True, compile=False)
    assert any("RMSNorm" in a for a in fast.applied) and any("SwiGLU" in a for a in fast.applied), fast.applied
    got_loss, got_grads = _loss_and_grads(model, fast, batch)
    assert abs(got_loss - ref_loss) / abs(ref_loss) < 1e-2
    for name, g in ref_grads.items():
        rel = float((got_grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 5e-2, (name, rel)
    fast.remove()
    again, _ = _loss_and_grads(model, None, batch)
    assert again == pytest.approx(ref_loss, rel=1e-6)


def _hook_on_call(model) -> None:
    """Make the model's decoder layers checkpoint as older transformers releases do: the hook gets a partial of
    `nn.Module.__call__` (a bound method), not of the layer's `forward`."""
    layers = model.base_model.model.model.layers
    cls = type(layers[0])

    class CallHookDecoderLayer(cls):  # the name ends like the layers that kernels/offload.py looks for
        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training:
                return self._gradient_checkpointing_func(functools.partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)

    CallHookDecoderLayer.forward = getattr(cls.forward, "__wrapped__", cls.forward)  # the un-checkpointed one
    for layer in layers:  # one class for all, as in a real model (compiled code guards on the layer's type)
        layer.__class__ = CallHookDecoderLayer


def _compiled_step(tiny_lora, ids, loss_and_grads, num_layers, offload, dropout=0.0, hook_on_call=False, stash=True,
                   **options):
    """PEFT's loss and grads without checkpointing, then the compiled, checkpointed fast path's (with these further
    FastPathOptions): (model, batch, reference, got, fast, backend log)."""
    model = tiny_lora("llama", num_layers=num_layers, dropout=dropout)
    if hook_on_call:
        _hook_on_call(model)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    torch.manual_seed(1)  # the same dropout masks in each run
    ref = loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    log = GraphLog()
    torch._dynamo.reset()
    fast = fast_path(model, "cpu", allow_cpu=True, offload=offload, stash_attention=stash, compile_backend=log,
                     **options)
    torch.manual_seed(1)
    return model, batch, ref, loss_and_grads(model, batch, fast), fast, log


def _assert_close(got, ref):
    assert torch.allclose(got[0], ref[0], rtol=1e-5), (got[0], ref[0])
    assert got[1].keys() == ref[1].keys()
    for name, g in ref[1].items():
        rel = float((got[1][name] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 1e-5, (name, rel)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_offloaded_blocks_compile_whole_once_per_mode(tiny_lora, tiny_tokenizer, loss_and_grads, fresh_dynamo,
                                                      dropout):
    """Without the attention stash, each block's forward is one compiled region inside the offloaded checkpoint:
    PEFT's loss and gradients, two compilations (forward without grad, recompute with grad) whatever the depth,
    the down projection's base matmul in forward and backward but not in the recompute, and undo restores the
    eager hooks."""
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11))
    counts = {}
    for layers in (2, 4):
        model, batch, ref, got, fast, log = _compiled_step(tiny_lora, ids, loss_and_grads, layers, True, dropout,
                                                           stash=False)
        _assert_close(got, ref)
        counts[layers] = len(log.dynamo)
    assert counts == {2: 2, 4: 2}
    assert fast.compiled and ("torch.compile of each block's whole forward as one region x4 "
                              "(its checkpoint hook outside it: x4)") in fast.describe()
    down = tuple(fast.decoder.layers[0].mlp.down_proj.base_layer.weight.shape)
    ops = torch.ops.tunery
    lora_out, group_out = ops.lora_out.default, ops.lora_group_out.default
    forward, recompute = log.weights("inference", lora_out), log.weights("forward", lora_out)
    # the whole block in one graph: q/k/v and gate/up as two groups, o and down alone (all seven alone under
    # dropout, where each projection draws its own mask)
    alone, groups = (2, 2) if dropout == 0 else (7, 0)
    assert len(forward) == alone and forward.count(down) == 1
    assert log.count("inference", group_out) == log.count("forward", group_out) == groups
    assert len(recompute) == alone - 1 and down not in recompute  # recomputing: the down projection's output is unread
    assert log.weights("backward", ops.lora_dx.default, torch.ops.aten.mm.default).count(down) == 1
    assert log.count("backward", ops.lora_group_dx.default) == log.count("backward", ops.lora_group_dx_chain.default) \
        == groups // 2  # q/k/v widen dy into one matmul; gate/up (four times wider here) chain theirs

    fast.remove()
    assert not fast.compiled
    assert all("offloaded" not in repr(layer._gradient_checkpointing_func) for layer in fast.decoder.layers)
    torch.manual_seed(1)
    _assert_close(loss_and_grads(model, batch), ref)
    assert len(log.dynamo) == 2  # the restored model runs eagerly


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_stashed_attention_compiles_apart_and_is_not_recomputed(tiny_lora, tiny_tokenizer, loss_and_grads,
                                                                fresh_dynamo, dropout):
    """With the attention stash (the default) the sublayer is its own compiled region, run once with grad in
    forward and never in the recompute: PEFT's loss and gradients (dropout masks included), five compilations
    whatever the depth (the block before and after the sublayer, without and with grad, and the sublayer), and
    only gate and up projections recomputed."""
    options = dict(offload_keep_bytes=0,  # tiny tensors too go through the host copies
                   stash_max_bytes_per_gflop=float("inf"))  # tiny blocks are all link
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11))
    counts = {}
    for layers in (2, 4):
        model, batch, ref, got, fast, log = _compiled_step(tiny_lora, ids, loss_and_grads, layers, True, dropout,
                                                           **options)
        _assert_close(got, ref)
        counts[layers] = len(log.dynamo)
    assert counts == {2: 5, 4: 5}
    assert "attention kept for backward in pinned CPU memory, not recomputed x4" in fast.describe()
    attn = fast.decoder.layers[0].self_attn
    mlp = fast.decoder.layers[0].mlp
    shape = {n: tuple(getattr(m, n).base_layer.weight.shape) for m, ns in ((attn, "q_proj k_proj v_proj o_proj"),
                                                                           (mlp, "gate_proj up_proj down_proj"))
             for n in ns.split()}
    lora_out, group_out = torch.ops.tunery.lora_out.default, torch.ops.tunery.lora_group_out.default
    no_grad, with_grad = log.weights("inference", lora_out), log.weights("forward", lora_out)
    grouped = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") if dropout == 0 else ()
    assert sorted(no_grad) == sorted(shape[n] for n in ("gate_proj", "up_proj", "down_proj") if n not in grouped)
    assert sorted(with_grad) == sorted(shape[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj") if n not in grouped)
    # grouped: gate/up without grad (forward), q/k/v (the kept sublayer) and gate/up (the recompute) with grad
    assert (log.count("inference", group_out), log.count("forward", group_out)) == ((1, 2) if grouped else (0, 0))
    fast.remove()
    assert not hasattr(attn, "_tunery_attention_run") and "forward" not in vars(attn)
    torch.manual_seed(1)
    _assert_close(loss_and_grads(model, batch), ref)


def test_compiled_blocks_when_the_hook_wraps_module_call(tiny_lora, tiny_tokenizer, loss_and_grads, fresh_dynamo):
    """Older transformers releases checkpoint `__call__`, not `forward`: the same results and compilations (five:
    the attention stash splits the block)."""
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11))
    _, _, ref, got, fast, log = _compiled_step(tiny_lora, ids, loss_and_grads, 3, True, hook_on_call=True,
                                               stash_max_bytes_per_gflop=float("inf"))
    _assert_close(got, ref)
    assert len(log.dynamo) == 5 and "offloaded" in fast.describe() and "one region x3" in fast.describe()


def test_plain_checkpointed_blocks_compile_whole_once(tiny_lora, tiny_tokenizer, loss_and_grads, fresh_dynamo):
    """Without offloading, torch's (non-reentrant) checkpoint runs the compiled forward and its recompute, both
    with grad: one compilation, PEFT's loss and gradients."""
    ids = torch.randint(0, len(tiny_tokenizer), (2, 11))
    _, _, ref, got, fast, log = _compiled_step(tiny_lora, ids, loss_and_grads, 3, False)
    _assert_close(got, ref)
    assert len(log.dynamo) == 1 and "offloaded" not in fast.describe()
    assert "one region x3 (its checkpoint hook outside it: x3)" in fast.describe()


@pytest.mark.gpu
def test_offloaded_blocks_compile_whole_with_inductor_gpu(fresh_dynamo):
    """As on the CPU, with inductor in bf16 and the attention stash through pinned memory and the side stream:
    PEFT's loss and gradients (bf16 tolerances), five compilations."""
    from torch._inductor.compile_fx import compile_fx

    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU: run on the device")
    model = _model("llama", num_layers=4)
    ids = torch.randint(0, 1000, (2, 128), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    ref_loss, ref_grads = _loss_and_grads(model, None, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    log = GraphLog(then=compile_fx)
    fast = fast_path(model, "cuda", compile_backend=log,
                     offload_keep_bytes=0,  # every saved tensor makes the round trip to host memory
                     stash_max_bytes_per_gflop=float("inf"))  # a small model: stash it anyway
    assert "offloaded" in fast.describe() and "one region x4" in fast.describe(), fast.describe()
    assert "attention kept" in fast.describe()
    for _ in range(2):
        got_loss, got_grads = _loss_and_grads(model, fast, batch)
    assert len(log.dynamo) == 5
    assert abs(got_loss - ref_loss) / abs(ref_loss) < 1e-2
    for name, g in ref_grads.items():
        rel = float((got_grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 5e-2, (name, rel)


_VARIED_SHAPES = """
import copy, json, sys
import torch
from tests.kernels.conftest import GraphLog
from tests.fastpath import fast_path
from tunery.models.load import remember_dynamic_shapes
from tunery.models.lora import apply_lora
from tunery.models.tiny import TinySpec, make_config, train_tokenizer
from tunery.train.loss import summed_loss
from transformers import AutoModelForCausalLM

tok = train_tokenizer(["hello world 123", "user", "assistant", "the quick brown fox"], vocab_size=300)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(make_config(TinySpec(hidden_size=32, intermediate_size=64, num_layers=2), tok))
key = remember_dynamic_shapes(model.config.to_dict())
model = apply_lora(model, 4, 8, 0.0)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
model.train()
reference = copy.deepcopy(model)
log = GraphLog()
fast = fast_path(model, "cpu", allow_cpu=True, compile_backend=log, offload_keep_bytes=0,
                 stash_max_bytes_per_gflop=float("inf"))
counts, errors = [], []
for b, n in json.loads(sys.argv[1]):  # (examples, length) of each micro-batch in turn
    ids = torch.randint(0, len(tok), (b, n))
    loss = summed_loss(model, {"input_ids": ids, "labels": ids}, fast)
    loss.backward()
    want = summed_loss(reference, {"input_ids": ids, "labels": ids}, None)
    errors.append(abs(float(loss) - float(want)) / abs(float(want)))
    counts.append(len(log.dynamo))
print(json.dumps({"key": key, "counts": counts, "errors": errors}))
"""


def _compile_counts(cache: Path, shapes: list[tuple[int, int]]) -> dict:
    """Run _VARIED_SHAPES in a process of its own (dynamo's state is per process) over micro-batches of `shapes`,
    torch.compile's caches in `cache`: the graphs compiled so far after each, the job key, the losses' errors."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(root)}
    env.pop("TORCH_COMPILE_JOB_ID", None)
    proc = subprocess.run([sys.executable, "-c", _VARIED_SHAPES, json.dumps(shapes)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(out["errors"]) < 1e-2, out["errors"]  # the compiled blocks compute what the eager model does
    return out


def test_sequence_lengths_compile_once_and_a_second_run_remembers_the_varying_batch(tmp_path):
    """The sequence length is marked dynamic before compiled code first sees it (kernels/dynamic.py), also past
    the attention stash's graph break: a first run's three lengths, the first equal to the hidden width, cost
    the compiles of one (unmarked, dynamo compiles each region static and again, dynamic, at the second length).
    The number of examples is not marked: it recompiles (dynamic) when it first changes, and torch's local
    profile-guided dynamic shapes, keyed by the model's config (models/load.py), remember that beside the
    compile caches, so a second run of the same model compiles each region once for all of it."""
    shapes = [(2, 32), (2, 96), (3, 144), (4, 48)]
    first = _compile_counts(tmp_path / "cache", shapes)
    second = _compile_counts(tmp_path / "cache", shapes)
    assert first["key"] == second["key"] and first["key"].startswith("tunery-")
    a, b = first["counts"], second["counts"]
    assert a[0] == a[1] == 5, a  # a new length: nothing compiled
    assert a[2] > a[1] and a[3] == a[2], a  # a new example count: compiled again (dynamic), then reused
    assert b[0] == b[-1] < a[-1], b  # compiled once, for every length and example count
    assert list((tmp_path / "cache" / "dynamo").glob("code_state_tunery-*"))


def test_a_job_id_of_the_users_is_kept(monkeypatch):
    from tunery.models.load import remember_dynamic_shapes

    monkeypatch.setattr(torch.compiler.config, "job_id", "mine")
    assert remember_dynamic_shapes({"hidden_size": 8}) is None and torch.compiler.config.job_id == "mine"
    keys = []
    for config in ({"hidden_size": 8}, {"hidden_size": 8}, {"hidden_size": 16}):
        monkeypatch.setattr(torch.compiler.config, "job_id", None)
        keys.append(remember_dynamic_shapes(config))
        assert torch.compiler.config.job_id == keys[-1]
    assert keys[0] == keys[1] != keys[2] and keys[0].startswith("tunery-")  # one key per model config
