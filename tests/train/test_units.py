"""Schedule, data order, gradient accumulation and checkpoint bookkeeping of the training loop."""

from __future__ import annotations

import json

import pytest
import torch

from tunery.config import RunConfig
from tunery.models.tiny import TinySpec, build_tiny_model, corpus_of
from tunery.train import checkpoint
from tunery.train.batching import step_examples
from tunery.train.loop import setup, train_step
from tunery.train.schedule import lr_multiplier


def test_schedule_warms_up_then_decays_to_zero():
    total, warmup = 100, 10
    assert lr_multiplier(0, total, warmup, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(9, total, warmup, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(10, total, warmup, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(55, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_multiplier(55, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_multiplier(99, total, 0, "constant") == 1.0


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
    n, per_step = 10, 5
    epoch0 = step_examples(n, 0, per_step, seed=3) + step_examples(n, 1, per_step, seed=3)
    epoch1 = step_examples(n, 2, per_step, seed=3) + step_examples(n, 3, per_step, seed=3)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert step_examples(n, 1, per_step, seed=3) == step_examples(n, 1, per_step, seed=3)
    assert step_examples(n, 1, per_step, seed=4) != step_examples(n, 1, per_step, seed=3)


def test_collate_pads_right_and_rounds_up_to_a_multiple():
    from tunery.data.tokenize import IGNORE, Tokenized
    from tunery.train.batching import collate

    batch = [Tokenized([5, 6, 7], [IGNORE, 6, 7], False), Tokenized([8], [8], False)]
    plain = collate(batch, 0, "cpu")
    assert plain["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert plain["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    rounded = collate(batch, 0, "cpu", multiple=64)
    assert rounded["input_ids"].shape == (2, 64) and int(rounded["attention_mask"].sum()) == 4
    unmasked = collate(batch, 0, "cpu", mask=False)
    assert "attention_mask" not in unmasked and unmasked["real_tokens"] == plain["real_tokens"] == 4
    assert all(torch.equal(unmasked[k], plain[k]) for k in ("input_ids", "labels"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    rows = [{"messages": [{"role": "user", "content": f"say {i} twice"},
                          {"role": "assistant", "content": f"{i} {i}" + " ok" * (i % 4)}]} for i in range(40)]
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_tiny_model(root / "m", corpus_of(rows), TinySpec(hidden_size=32, intermediate_size=64,
                                                                   num_layers=1, vocab_size=300))
    return root, model, data


def _trainer(tiny, monkeypatch, **kw):
    root, model, data = tiny
    monkeypatch.setenv("TUNERY_HOME", str(root / "home"))
    cfg = RunConfig(model=str(model), data=str(data), **{"eval_split": 0, "lora_dropout": 0.0, "max_steps": 3, **kw})
    return setup(cfg, root)


def test_gradient_accumulation_equals_one_big_batch(tiny, monkeypatch):
    big = _trainer(tiny, monkeypatch, batch_size=8, grad_accum=1)
    small = _trainer(tiny, monkeypatch, batch_size=4, grad_accum=2)
    # same examples per step, same loss (mean over all trained tokens of the step), same update
    a, b = train_step(big, 0), train_step(small, 0)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for (na, pa), (nb, pb) in zip(big.model.named_parameters(), small.model.named_parameters()):
        if pa.requires_grad:
            assert nb == na and (pa - pb).abs().max() < 1e-5, na


def test_packed_step_equals_padded_step(tiny, monkeypatch):
    padded = _trainer(tiny, monkeypatch, batch_size=4, grad_accum=2)
    packed = _trainer(tiny, monkeypatch, batch_size=4, grad_accum=2, packing=True)
    a, b = train_step(padded, 0), train_step(packed, 0)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert b["tokens"] == a["tokens"]  # real tokens, not padding
    for (na, pa), (nb, pb) in zip(padded.model.named_parameters(), packed.model.named_parameters()):
        if pa.requires_grad:
            assert nb == na and (pa - pb).abs().max() < 1e-5, na


def test_the_fast_path_steps_padded_batches_without_a_mask_to_the_same_update(tiny, monkeypatch):
    """The fast path's models are causal and pad on the right, so the loop leaves the mask out (sdpa's causal
    kernel, nothing read back): the step is the reference's, padded rows and all."""
    from tests.fastpath import fast_path
    from tunery.train import loop
    from tunery.train.loop import step_graphs

    reference = _trainer(tiny, monkeypatch, batch_size=4, grad_accum=2)
    fast = _trainer(tiny, monkeypatch, batch_size=4, grad_accum=2)
    fast.fast = fast_path(fast.model, "cpu", allow_cpu=True, compile=False)
    fast.graphs = step_graphs(fast.model, fast.fast, "cpu")
    seen = []  # the keys of each batch the fast trainer's micro-batch steps compute the loss of
    summed_loss = loop.summed_loss

    def spy(model, batch, path=None):
        if model is fast.forward_model:
            seen.append(sorted(batch))
        return summed_loss(model, batch, path)

    monkeypatch.setattr(loop, "summed_loss", spy)
    a, b = train_step(reference, 0), train_step(fast, 0)
    assert seen == [["input_ids", "labels"]] * 2
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["tokens"] == a["tokens"]
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for (na, pa), (nb, pb) in zip(reference.model.named_parameters(), fast.model.named_parameters()):
        if pa.requires_grad:
            assert nb == na and (pa - pb).abs().max() < 1e-5, na


def test_only_lora_weights_train_and_full_method_trains_everything(tiny, monkeypatch):
    lora = _trainer(tiny, monkeypatch)
    names = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names if "lora_A" in n} >= {"q_proj", "v_proj", "down_proj"}
    full = _trainer(tiny, monkeypatch, method="full")
    assert all(p.requires_grad for p in full.model.parameters())


def test_checkpoints_skip_unfinished_folders_and_keep_the_newest(tiny, monkeypatch, tmp_path):
    t = _trainer(tiny, monkeypatch)
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(folder, step, t.model, t.optimizer, t.scheduler, keep=2)
    (folder / "step-0000009.tmp").mkdir()  # what a kill during a write leaves behind
    assert [p.name for p in checkpoint.list_checkpoints(folder)] == ["step-0000002", "step-0000003"]
    assert checkpoint.load_checkpoint(folder / "step-0000003", t.model, t.optimizer, t.scheduler) == 3


def test_report_to_forwards_metrics_to_an_installed_tracker_and_names_missing_ones(tmp_path, monkeypatch):
    import sys
    import types

    from tunery.errors import TuneryError
    from tunery.train.metrics import MetricsFile
    from tunery.train.reporters import Reporters

    calls = []
    fake = types.ModuleType("trackio")
    fake.__spec__ = types.SimpleNamespace(name="trackio")
    fake.init = lambda **kw: calls.append(("init", kw["project"], kw["name"]))
    fake.log = lambda rec, step: calls.append(("log", step, rec["loss"]))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "trackio" else None)
    metrics = MetricsFile(tmp_path / "metrics.jsonl", reporters=Reporters(["trackio"], tmp_path / "r1", "p", {}))
    metrics.write({"step": 3, "loss": 1.5, "lr": 0.1})
    metrics.close()
    assert calls == [("init", "p", "r1"), ("log", 3, 1.5), ("finish",)]
    with pytest.raises(TuneryError, match="wandb is not installed"):
        Reporters(["wandb"], tmp_path, "p", {})
    with pytest.raises(TuneryError, match="unknown tracker"):
        Reporters(["mlflow"], tmp_path, "p", {})


def test_cuda_runs_get_an_expandable_allocator_unless_the_user_set_one(monkeypatch):
    import os

    import torch

    from tunery.models import load

    for var in (*load.ALLOC_VARS, *load.COMPILE_CACHE_VARS):  # set then unset: monkeypatch puts the originals back
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    assert load.pick_device("cpu") == "cpu" and not any(v in os.environ for v in load.ALLOC_VARS)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load.pick_device("auto") == "cuda"
    assert os.environ["PYTORCH_ALLOC_CONF"] == os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's own setting stays
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    assert not load.lean_cuda_allocator() and os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # too late once CUDA has started
    assert not load.lean_cuda_allocator() and "PYTORCH_ALLOC_CONF" not in os.environ


def test_cuda_runs_keep_compile_caches_under_tunery_home_unless_the_user_set_them(monkeypatch, tmp_path):
    import os

    from tunery.models import load

    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    for var in load.COMPILE_CACHE_VARS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert load.keep_compile_caches() == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "home/cache/torchinductor")}
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")
    assert (tmp_path / "home/cache/torchinductor").is_dir()


def test_a_step_groups_its_padded_micro_batches_by_length():
    from tunery.data.tokenize import Tokenized
    from tunery.train.batching import micro_batches

    lengths = [30, 3, 28, 5, 25, 4, 31, 6]
    picked = [Tokenized([1] * n, [1] * n, False) for n in lengths]

    def padding(batches) -> int:
        return sum(len(b) * max(len(t.input_ids) for t in b) - sum(len(t.input_ids) for t in b) for b in batches)

    grouped = micro_batches(picked, 4)
    assert [[len(t.input_ids) for t in b] for b in grouped] == [[3, 4, 5, 6], [25, 28, 30, 31]]
    as_drawn = micro_batches(picked, 4, by_length=False)
    assert [len(t.input_ids) for b in as_drawn for t in b] == lengths  # the draw's order, for packed rows
    assert padding(grouped) == 16 < padding(as_drawn) == 112
    # across ranks: every example once, each rank's micro-batches alike in length
    ranks = [micro_batches(picked, 2, rank, world=2) for rank in (0, 1)]
    assert sorted(len(t.input_ids) for r in ranks for b in r for t in b) == sorted(lengths)
    assert [[len(t.input_ids) for t in b] for b in ranks[0]] == [[3, 4], [25, 28]]
    assert [[len(t.input_ids) for t in b] for b in ranks[1]] == [[5, 6], [30, 31]]


def test_a_non_finite_loss_stops_training_before_anything_is_saved(tiny, monkeypatch):
    from tunery.errors import RunError
    from tunery.train import loop

    t = _trainer(tiny, monkeypatch, save_every=1)
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda t, step: {**real(t, step), "loss": float("nan")} if step == 1
                        else real(t, step))
    with pytest.raises(RunError, match=r"loss became nan at step 2.*Lower --lr"):
        loop.run_loop(t, 0, None)
    checkpoints = t.run / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())  # main rank only saves; none got there


def test_a_learning_rate_that_is_not_finite_is_refused():
    from tunery.config import ConfigError

    for bad in ("inf", "nan"):
        with pytest.raises(ConfigError, match="lr must be a finite number"):
            RunConfig.from_dict({"lr": bad})


def test_eval_data_that_is_the_training_file_is_refused(tiny):
    from tunery.data.dataset import prepare_data
    from tunery.errors import DataError

    _, model, data = tiny
    cfg = RunConfig(model=str(model), data=str(data), eval_data=str(data))
    with pytest.raises(DataError, match="eval_data is the training file itself"):
        prepare_data(cfg, tokenizer=None)


def test_the_training_eval_reads_at_most_eval_max_rows(tiny, monkeypatch):
    from tunery.train import loop

    t = _trainer(tiny, monkeypatch, eval_split=0.5, eval_max_rows=7)
    seen = []
    monkeypatch.setattr(loop, "held_out_loss", lambda model, rows, *a, **kw: seen.append(rows) or {"loss": 1.0})
    loop._eval(t)
    loop._eval(t)
    assert len(t.data.eval) > 7 and [len(r) for r in seen] == [7, 7] and seen[0] == seen[1]  # the same sample


def test_config_paths_are_made_absolute(tmp_path):
    (tmp_path / "m").mkdir()
    cfg = RunConfig(model="m", data="d.jsonl", eval_data="e.jsonl", output_dir="runs").with_absolute_paths(tmp_path)
    assert (cfg.model, cfg.data, cfg.eval_data, cfg.output_dir) == (
        str(tmp_path / "m"), str(tmp_path / "d.jsonl"), str(tmp_path / "e.jsonl"), str(tmp_path / "runs"))
    assert RunConfig(model="Qwen/Qwen2.5-0.5B").with_absolute_paths(tmp_path).model == "Qwen/Qwen2.5-0.5B"


def _prepared(tmp_path, rows, **kw):
    from tunery.data.dataset import prepare_data
    from tunery.models.tiny import train_tokenizer

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([json.dumps(r) for r in rows], 400)
    return prepare_data(RunConfig(model="m", data=str(path), **kw), tok)


def _pair(i: int) -> dict:
    return {"prompt": f"question {i}", "completion": f"answer {i}"}


def test_the_data_gate_refuses_what_would_mostly_not_train(tmp_path, monkeypatch):
    from tunery.errors import DataError

    monkeypatch.setenv("TUNERY_HOME", str(tmp_path / "home"))
    bad = [{"prompt": f"q{i}", "completion": {"value": i}} for i in range(6)]
    with pytest.raises(DataError, match=r"6 of 10 rows were rejected \('completion' holds an object.*allow-data"):
        _prepared(tmp_path, [_pair(i) for i in range(4)] + bad)
    assert len(_prepared(tmp_path, [_pair(i) for i in range(4)] + bad, allow_data_issues=True).train) >= 3
    with pytest.raises(DataError, match="training rows are cut by max_seq_len"):
        _prepared(tmp_path, [{"prompt": f"q {i}", "completion": "a " * 80} for i in range(10)], max_seq_len=48)
    with pytest.raises(DataError, match="held-out rows are also training rows"):
        _prepared(tmp_path, [_pair(0)] * 20)
    assert _prepared(tmp_path, [_pair(i) for i in range(20)]).eval  # clean data passes


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A model whose LoRA matrices reach the 4,096 elements bitsandbytes quantizes moments from (16 x 256)."""
    root = tmp_path_factory.mktemp("wide")
    rows = [{"messages": [{"role": "user", "content": f"count to {i}"},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(i % 9 + 2))}]}
            for i in range(40)]
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = build_tiny_model(root / "m", corpus_of(rows), TinySpec(hidden_size=256, intermediate_size=256,
                                                                   num_layers=1, vocab_size=300))
    return root, model, data


def test_the_8bit_optimizer_keeps_8bit_moments_follows_adamw_and_resumes_exactly(wide, monkeypatch, tmp_path):
    pytest.importorskip("bitsandbytes", reason="the qlora extra (make test installs it)")
    plain = _trainer(wide, monkeypatch, lr=1e-3, batch_size=8, max_steps=4)
    eight = _trainer(wide, monkeypatch, lr=1e-3, batch_size=8, max_steps=4, optimizer="adamw_8bit")
    start = {n: p.detach().clone() for n, p in eight.model.named_parameters() if p.requires_grad}
    for step in range(2):
        a, b = train_step(plain, step), train_step(eight, step)
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02), step
    moments = [s["state1"] for s in eight.optimizer.state.values()]
    assert moments and any(m.dtype == torch.uint8 for m in moments)  # the big matrices' moments: one byte each
    for (name, p), (_, q) in zip(plain.model.named_parameters(), eight.model.named_parameters()):
        if p.requires_grad and p.numel() >= 4096:  # the same direction and size of update, up to quantization
            moved, eight_moved = (p.detach() - start[name]).flatten(), (q.detach() - start[name]).flatten()
            assert torch.nn.functional.cosine_similarity(moved, eight_moved, dim=0) > 0.95, name
            assert float(eight_moved.norm()) == pytest.approx(float(moved.norm()), rel=0.1), name

    saved = checkpoint.save_checkpoint(tmp_path / "checkpoints", 2, eight.model, eight.optimizer, eight.scheduler,
                                       keep=1)
    straight = [train_step(eight, step)["loss"] for step in (2, 3)]
    resumed = _trainer(wide, monkeypatch, lr=1e-3, batch_size=8, max_steps=4, optimizer="adamw_8bit")
    assert checkpoint.load_checkpoint(saved, resumed.model, resumed.optimizer, resumed.scheduler) == 2
    assert [train_step(resumed, step)["loss"] for step in (2, 3)] == pytest.approx(straight, rel=1e-6)
    for (name, p), (_, q) in zip(eight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "adamw_8bit"}, r"optimizer adamw_8bit needs bitsandbytes: pip install 'tunery\[qlora\]' \(or use "
                                  r"optimizer adamw\)"),
    ({"method": "qlora"}, r"method qlora needs bitsandbytes: .*\(or use method lora\)"),
    ({"method": "qlora", "optimizer": "adamw_8bit"},
     r"method qlora and optimizer adamw_8bit need bitsandbytes: .*\(or use method lora and optimizer adamw\)"),
])
def test_a_run_needing_bitsandbytes_without_it_is_refused_before_anything_loads(tiny, monkeypatch, settings, message):
    import importlib.util

    from tunery.config import ConfigError
    from tunery.train import loop

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else found(name, *a))
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    monkeypatch.setattr(loop, "prepare_data", lambda *a, **k: pytest.fail("the data was prepared"))
    with pytest.raises(ConfigError, match=message):
        _trainer(tiny, monkeypatch, **settings)
