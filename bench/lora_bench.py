"""LoRA SFT step throughput and peak GPU memory: tunery against Unsloth and a plain HF+PEFT stack, side by side.

Random-init models from public architecture configs (speed and memory do not depend on weight values),
LoRA r=16 (alpha 32, dropout 0) on every linear layer of the blocks (`targets`), random token batches, labels on every
token, activation checkpointing on, AdamW. Each run is its own process (peak memory is per process, and
Unsloth patches transformers when imported). On the GPU machine, with the reference stacks unpacked on
PYTHONPATH (bench/reference-stacks-bundle.sh builds them; bench/gpu_env.sh unpacks them):

    python bench/lora_bench.py --rows llama-1b qwen-0.5b llama-8b   # rows by name (ROWS), 3 stacks each
    python bench/lora_bench.py --rows qwen-7b llama-8b-4bit llama-8b-16k
    python bench/lora_bench.py --rows llama-1b --repeat 2   # stacks alternate twice; median and spread
    python bench/lora_bench.py --rows gemma3-1b phi3.5-mini lfm2-1.2b   # the families after Llama and Qwen
    python bench/lora_bench.py --rows maxseq     # longest sequence at bs 1 in 80 GB (to 4,096), tunery vs Unsloth
    python bench/lora_bench.py --one tunery llama-8b 2 2048 [--quant 4bit] [--profile]   # a single run
    python bench/lora_bench.py --rows llama-1b-8k-packed llama-8b-16k-packed   # packed rows (PACKED): tunery's
        # varlen attention against its dense block mask (--no-varlen) and HF+PEFT's; Unsloth is not run on them

Prints one JSON line per run, then a table per row: tokens/s, useful TFLOP/s, peak GiB, ratio to each
reference. Useful FLOPs per token are 4 x (matmul params) + attention (forward 2*L*seq*hidden, x3); the
recompute of checkpointing is not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time


def _arch_table() -> dict[str, tuple[str, dict]]:
    """Shape name -> (transformers config class, public config.json values): the families' `bench` shapes
    (tunery/models/catalog.py)."""
    from tunery.models.catalog import bench_shapes

    return {name: (cls, kw) for name, (_, cls, kw) in bench_shapes().items()}


ARCHS = _arch_table()
ROWS = {  # name: (arch, batch, seq, quant)
    "llama-1b": ("llama-1b", 4, 2048, ""),
    "qwen-0.5b": ("qwen-0.5b", 8, 2048, ""),
    "llama-8b": ("llama-8b", 2, 2048, ""),
    "qwen-7b": ("qwen-7b", 2, 2048, ""),
    "llama-8b-4bit": ("llama-8b", 2, 2048, "4bit"),
    "llama-8b-16k": ("llama-8b", 1, 16384, ""),
    "gemma3-1b": ("gemma3-1b", 4, 2048, ""),
    "phi3.5-mini": ("phi3.5-mini", 2, 2048, ""),
    "lfm2-1.2b": ("lfm2-1.2b", 4, 2048, ""),
}
# name: (arch, seq, examples): one row of `seq` tokens holding that many examples, their lengths drawn at random
# (seeded; `packed_row`), as `tunery train --packing` builds it (train/batching.pack_batch); bs 1
PACKED = {
    "llama-1b-8k-packed": ("llama-1b", 8192, 16),
    "llama-8b-16k-packed": ("llama-8b", 16384, 32),
}
STACKS = ("tunery", "unsloth", "hf")
MODELS = os.environ.get("BENCH_MODELS", "/tmp/bench-models")


def _config(arch: str):
    import transformers

    cls_name, kw = ARCHS[arch]
    return getattr(transformers, cls_name)(**kw)


def targets(arch: str) -> list[str]:
    """Every linear layer of the blocks: the family's LoRA targets (tunery/models/catalog.py)."""
    from tunery.models.catalog import family_of

    return list(family_of(_config(arch).model_type).lora_targets)


def model_dir(arch: str) -> str:
    """A saved random-init model + word-level tokenizer, for loaders that read a folder (Unsloth, 4-bit)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = os.path.join(MODELS, arch)
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return path
    cfg = _config(arch)
    torch.manual_seed(0)
    with torch.device("cuda"):
        transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size - 3)}
    vocab.update({"<unk>": cfg.vocab_size - 3, "<s>": cfg.vocab_size - 2, "</s>": cfg.vocab_size - 1})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                         pad_token="<unk>").save_pretrained(path)
    torch.cuda.empty_cache()
    return path


def packed_row(seq: int, examples: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """position_ids and example bounds (0, each end) of one packed row: `examples` lengths summing to `seq`."""
    import random

    cuts = sorted(random.Random(seed).sample(range(1, seq), examples - 1))
    bounds = [0, *cuts, seq]
    return [i for s, e in zip(bounds, bounds[1:]) for i in range(e - s)], bounds


def _packed_extras(seq: int, examples: int) -> dict:
    import torch

    positions, bounds = packed_row(seq, examples)
    return {"position_ids": torch.tensor([positions], device="cuda"),
            "doc_bounds": torch.tensor(bounds, dtype=torch.int32, device="cuda")}


def _build_tunery(arch: str, quant: str, fast_opts: dict, packed: int = 0):
    import torch
    import transformers

    from tunery.config import RunConfig
    from tunery.kernels.apply import fast_path_for
    from tunery.kernels.options import FastPathOptions
    from tunery.models.catalog import family_of_model
    from tunery.models.load import load_model, pick_device
    from tunery.train.loop import make_trainable, step_graphs
    from tunery.train.loss import summed_loss

    pick_device("cuda")  # as `tunery train` does: sets the CUDA allocator up before CUDA starts
    if quant:
        model = load_model(model_dir(arch), "cuda", torch.bfloat16, four_bit=True)
    else:
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(_config(arch), dtype=torch.bfloat16)
    cfg = RunConfig(method="qlora" if quant else "lora", lora_r=16, lora_alpha=32, lora_dropout=0.0,
                    lora_targets=targets(arch), gradient_checkpointing=True)
    model = make_trainable(model, cfg)  # exactly what `tunery train` trains
    fast = fast_path_for(model, "cuda", family_of_model(model), FastPathOptions(**fast_opts), packing=bool(packed),
                         checkpointing=True)
    runner = step_graphs(model, fast, "cuda", packed=bool(packed))
    print(fast.describe() + "; " + runner.describe(), file=sys.stderr)
    _watch_stash()

    def forward_backward(batch, scale):  # train/loop.py's train_step runs this per micro-batch
        loss = summed_loss(model, batch, fast)
        (loss * scale).backward()
        return loss.detach()

    def step(ids, extras):
        batch = {"input_ids": ids, "labels": ids, **extras}  # no padding, and the fast path passes no mask
        runner(forward_backward, batch, 1 / (ids.shape[0] * (ids.shape[1] - 1)))

    step.runner = runner  # its state goes into the row's result (`graphs`)
    return model, step


def _options_tag(fast_opts: dict) -> str:
    """The row's label for the FastPathOptions away from their defaults (` -compile`, ` output_fetch=block`)."""
    from tunery.kernels.options import FastPathOptions

    changed = FastPathOptions(**fast_opts).changed()
    return "".join(f" -{k}" if v is False else f" +{k}" if v is True else f" {k}={v}" for k, v in changed.items())


STASH_MIB: list[float] = []  # the host copies of the first kept attention sublayer, MiB each


def _watch_stash() -> None:
    """Record what the first block's attention stash copies to the host (reported as `stash_mib`)."""
    from tunery.kernels import offload

    keep = offload._AttentionStash.keep_graph

    def watched(self, *args):
        out = keep(self, *args)
        if not STASH_MIB:
            STASH_MIB.extend(round(h.numel() / 2**20, 1) for h in self.host)
        return out

    offload._AttentionStash.keep_graph = watched


def _build_unsloth(arch: str, quant: str, seq: int):
    import torch
    import unsloth  # noqa: F401  (patches transformers before it loads a model)
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir(arch), max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=bool(quant), local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=targets(arch),
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=0)

    def step(ids, extras):
        if extras:
            raise SystemExit("unsloth: packed rows are not benchmarked")
        model(input_ids=ids, labels=ids).loss.backward()

    return model, step


def _build_hf(arch: str, quant: str):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quant:
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir(arch), quantization_config=bnb,
                                                                  dtype=torch.bfloat16, device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(_config(arch), dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets(arch)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()

    def step(ids, extras):  # packed: the restarting position_ids make transformers build a block-diagonal mask
        model(input_ids=ids, labels=ids, position_ids=extras.get("position_ids")).loss.backward()

    return model, step


def _useful_flops_per_token(arch: str, seq: float) -> float:
    """4 x the matmul weights (the blocks' linears and the lm_head) + causal attention (forward 2 x seq x width
    per attention layer, x3 with backward), counted on a model built on the meta device. A packed row's
    attention counts each example over itself: `seq` is then sum(length^2) / row length."""
    import torch
    import transformers

    cfg = _config(arch)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    n_mat = sum(m.weight.numel() for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and (".layers." in name or name.endswith("lm_head")))
    # q/k/v apart (Llama, Gemma, LFM2's attention blocks); Gemma 3's sliding-window layers counted as full ones
    attention = [m for m in model.modules() if hasattr(m, "q_proj")]
    width = attention[0].q_proj.out_features if attention else cfg.hidden_size  # Phi-3: q/k/v in one linear
    layers = len(attention) or cfg.num_hidden_layers
    return 4 * n_mat + 3 * 2 * layers * seq * width


def run_one(stack: str, arch: str, bs: int, seq: int, quant: str = "", steps: int = 6, warmup: int = 3,
            fast_opts: dict | None = None, profile: bool = False, skip_guards: bool = False,
            memory: bool = False, packed: int = 0) -> dict:
    import torch

    if packed and bs != 1:
        raise SystemExit("--packed: one packed row a step (bs 1)")
    torch.manual_seed(0)
    t_load = time.perf_counter()
    if stack == "tunery":
        model, step = _build_tunery(arch, quant, fast_opts or {}, packed)
    elif stack == "unsloth":
        model, step = _build_unsloth(arch, quant, seq)
    else:
        model, step = _build_hf(arch, quant)
    model.train()
    load_s = time.perf_counter() - t_load
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    vocab = _config(arch).vocab_size
    batches = [torch.randint(0, vocab - 3, (bs, seq), device="cuda") for _ in range(2)]
    extras = _packed_extras(seq, packed) if packed else {}
    torch.cuda.reset_peak_memory_stats()
    times, hosts, err = [], [], None

    def one_step(i: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(batches[i % 2], extras)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hosts.append(time.perf_counter() - t0)  # the host has queued the whole step: near the step's time = host-bound
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    try:
        for i in range(warmup + steps):
            dt = one_step(i)
            if i == warmup - 1:  # every stack alike: no collection of the warm-up's objects inside a timed step
                gc.collect()
                gc.freeze()
                if skip_guards:
                    torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
            if i >= warmup:
                times.append(dt)
        if profile and times:  # after the timed steps, so the profiler's overhead stays out of tokens/s
            _profile_steps(one_step)
        if memory and times:
            _memory_at_peak(one_step)
    except torch.cuda.OutOfMemoryError:
        err = "OOM"
    tag = stack + _options_tag(fast_opts or {})
    tag += " +skip-guards" * skip_guards + " +cpp-wrapper" * _cpp_wrapper()
    weights = (quant or "bf16") + (f", {packed} examples packed" if packed else "")
    res = {"stack": tag, "arch": arch, "bs": bs, "seq": seq, "quant": weights, "err": err,
           "load_s": round(load_s, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
    if STASH_MIB:
        res["stash_mib"] = STASH_MIB
    runner = getattr(step, "runner", None)
    if runner is not None:  # whether the timed steps replayed CUDA graphs, or why they ran eagerly
        res["graphs"] = f"{len(runner._graphs)} captured" if runner.enabled else f"off: {runner.reason[:160]}"
    if times:  # warm-up steps absorb compilation and autotuning
        med = sorted(times)[len(times) // 2]
        tok_s = bs * seq / med
        res.update(step_s=round(med, 4), tok_s=round(tok_s), steps_ms=[round(t * 1e3) for t in times],
                   host_ms=round(sorted(hosts[warmup:warmup + len(times)])[len(times) // 2] * 1e3),
                   tflops=round(tok_s * _useful_flops_per_token(arch, _context(seq, packed)) / 1e12, 1))
    return res


def _context(seq: int, packed: int) -> float:
    """The length each token's attention spans on average (for FLOPs): the row's, or its examples' when packed."""
    if not packed:
        return seq
    _, bounds = packed_row(seq, packed)
    return sum((e - s) ** 2 for s, e in zip(bounds, bounds[1:])) / seq


def _cpp_wrapper() -> bool:
    import torch._inductor.config

    return bool(torch._inductor.config.cpp_wrapper)


def _profile_steps(one_step) -> None:
    """One step under a light profiler (kernel table, how busy the GPU was), then one with Python stacks and
    shapes (where the copies and elementwise ops come from)."""
    import torch

    cpu_cuda = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=cpu_cuda) as prof:
        wall = one_step(0)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40), file=sys.stderr)
    print(_busy(prof, wall), file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    if os.environ.get("BENCH_TRACE"):  # for bench/trace_gaps.py: where the GPU waits on the host
        prof.export_chrome_trace(os.environ["BENCH_TRACE"])
    if os.environ.get("BENCH_TRACE_GPU"):  # GPU activity alone: less host overhead than the step above
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            wall = one_step(0)
        prof.export_chrome_trace(os.environ["BENCH_TRACE_GPU"])
        print(f"GPU-only profiled step: {wall * 1e3:.1f} ms", file=sys.stderr)
    with torch.profiler.profile(activities=cpu_cuda, record_shapes=True, with_stack=True) as prof:
        one_step(1)
    _print_copies(prof)


def _memory_at_peak(one_step, top: int = 25) -> None:
    """One step under the CUDA allocator's history: when its memory peaked, and the tensors live then, largest
    first, each with the innermost frames of tunery, transformers, peft or torch code that allocated it."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    one_step(0)
    snap = torch.cuda.memory._snapshot()
    if os.environ.get("BENCH_MEMORY_SNAPSHOT"):  # the whole history, for torch.cuda's memory viz or a script
        import pickle

        with open(os.environ["BENCH_MEMORY_SNAPSHOT"], "wb") as f:
            pickle.dump(snap, f)
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snap["device_traces"] for e in trace]
    live, total, peak, at_peak = {}, 0, 0, {}
    for e in events:  # replay the step's allocations and frees; the step starts with `base` bytes in use
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    print(f"memory: {base / 2**30:.2f} GiB before the step, peak {(base + peak) / 2**30:.2f} GiB "
          f"({peak / 2**30:.2f} GiB allocated during the step and live at the peak)", file=sys.stderr)

    def where(e) -> str:
        frames = [f for f in e.get("frames", []) if any(k in f["filename"] for k in
                  ("tunery", "transformers", "peft", "torch/_inductor", "torch/optim", "bitsandbytes", "liger",
                   "torch/_dynamo/eval_frame", "torch/autograd"))]
        return " < ".join(f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in frames[:7]) or "?"

    grouped = {}
    for e in at_peak.values():
        key = where(e)
        n, size = grouped.get(key, (0, 0))
        grouped[key] = (n + 1, size + e["size"])
    for key, (n, size) in sorted(grouped.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {size / 2**20:9.1f} MiB  x{n:<4d} {key}", file=sys.stderr)


def _busy(prof, wall_s: float) -> str:
    """Time some kernel ran on the GPU (host<->device copies left out: they run on a side stream), by kind,
    against the step's wall time: a step well above its busy time waits on the host."""
    spans, kinds = [], {}
    for e in prof.events():
        if not str(e.device_type).endswith("CUDA") or e.name.startswith(("Memcpy HtoD", "Memcpy DtoH")):
            continue
        spans.append((e.time_range.start, e.time_range.end))
        n = e.name.lower()
        kind = ("attention" if "attention" in n or "sdpa" in n or "flash" in n else
                "gemm" if "gemm" in n or "nvjet" in n or "cutlass" in n or "xmma" in n else
                "device copy" if n.startswith("memcpy") else "triton" if n.startswith("triton") else "other")
        kinds[kind] = kinds.get(kind, 0) + (e.time_range.end - e.time_range.start)
    busy, last = 0, float("-inf")
    for start, end in sorted(spans):
        busy += max(0, end - max(start, last))
        last = max(last, end)
    parts = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return (f"GPU busy {busy / 1e3:.1f} ms of a {wall_s * 1e3:.1f} ms step ({100 * busy / 1e3 / (wall_s * 1e3):.0f}%); "
            f"kernel ms by kind: {parts}")


COPIES = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::cat", "aten::add", "aten::mul")


def _print_copies(prof) -> None:
    """Where the copy and elementwise ops come from (Python stack, input shapes)."""
    events = [e for e in prof.key_averages(group_by_input_shape=True, group_by_stack_n=6) if e.key in COPIES]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    for e in events[:25]:
        stack = " <- ".join(s.split("/")[-1] for s in e.stack[:6] if "torch/" not in s)
        print(f"{e.device_time_total / 1e3:9.1f} ms  x{e.count:<5d} {e.key} {e.input_shapes}  {stack}",
              file=sys.stderr)


def _spawn(stack: str, arch: str, bs: int, seq: int, quant: str, steps: int, extra: list[str],
           warmup: int = 3) -> dict:
    cmd = [sys.executable, __file__, "--one", stack, arch, str(bs), str(seq), "--steps", str(steps),
           "--warmup", str(warmup), *extra]
    if quant:
        cmd += ["--quant", quant]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        res = {"stack": stack, "arch": arch, "bs": bs, "seq": seq, "quant": quant or "bf16",
               "err": f"exit {proc.returncode}: {' | '.join(tail)}"}
    else:
        res = json.loads(lines[-1])
    print(json.dumps(res), flush=True)
    return res


def _ratio(r: dict, o: dict | None) -> str:
    if not o or "tok_s" not in o or "tok_s" not in r:
        return "-"
    return f"{r['tok_s'] / o['tok_s']:.2f}x speed, {r['peak_gib'] / o['peak_gib']:.2f}x mem"


def _table(results: list[dict]) -> str:
    out = ["| model | bs x seq | weights | stack | tokens/s | TFLOP/s | peak GiB | vs Unsloth | vs HF+PEFT |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        same = [o for o in results if (o["arch"], o["bs"], o["seq"], o["quant"]) == (r["arch"], r["bs"], r["seq"],
                                                                                       r["quant"])]
        ref = {o["stack"]: o for o in same}
        mine = r["stack"].startswith("tunery")
        speed = f"{r['tok_s']:,}" if "tok_s" in r else r.get("err") or r.get("note") or "-"
        if len(r.get("repeats_tok_s", ())) > 1:
            speed += f" ({min(r['repeats_tok_s']):,}-{max(r['repeats_tok_s']):,})"
        stack = r["stack"] + (" (eager: graphs off)" if str(r.get("graphs", "")).startswith("off") else "")
        out.append(f"| {r['arch']} | {r['bs']} x {r['seq']} | {r['quant']} | {stack} | {speed} | "
                   f"{r.get('tflops', '-')} | {r.get('peak_gib', '-')} | "
                   f"{_ratio(r, ref.get('unsloth')) if mine else ''} | {_ratio(r, ref.get('hf')) if mine else ''} |")
    return "\n".join(out)


def _max_seq(stack: str, arch: str, extra: list[str], budget_gib: float = 78.0, tries: int = 4,
             spawn=None) -> dict:
    """Longest bs-1 sequence whose step fits, to 4,096 tokens: peak memory is linear in the sequence (flash
    attention, chunked loss), so two measured lengths give the line to `budget_gib`; the longest multiple of 4096
    under it is run for one step, then 4,096 longer while it fits or shorter while it does not, until one length
    fits and the next does not, up to `tries` lengths (a step there takes minutes)."""
    spawn = spawn or _spawn
    a, b = (spawn(stack, arch, 1, seq, "", 1, extra, warmup=1) for seq in (8192, 16384))
    if "tok_s" not in a or "tok_s" not in b:
        return {**b, "err": f"could not measure: {a.get('err') or b.get('err')}"}
    per_token = (b["peak_gib"] - a["peak_gib"]) / 8192
    estimate = int(16384 + (budget_gib - b["peak_gib"]) / per_token)
    seq, fit, failed, found = estimate // 4096 * 4096, None, [], False
    for _ in range(tries):
        res = spawn(stack, arch, 1, seq, "", 1, extra, warmup=0)
        if res.get("err") not in (None, "OOM"):
            return {**res, "estimate": estimate}
        if res.get("err") == "OOM":
            failed.append(seq)
        else:
            fit = res
        found = fit is not None and min(failed, default=0) - fit["seq"] == 4096  # fits, 4,096 more does not
        if found:
            break
        seq = seq + 4096 if res.get("err") is None else seq - 4096
    res = dict(fit or res)
    for key in ("step_s", "tok_s", "tflops"):  # one step, compilation included: a fit check, not a speed
        res.pop(key, None)
    if fit is None:
        note = f"no length fits down to {seq + 4096:,}"
    elif found:
        note = f"longest: {fit['seq']:,} fits, {min(failed):,} does not"
    else:
        note = f"{fit['seq']:,} fits; the limit was not reached in {tries} lengths"
    return {**res, "estimate": estimate, "oom_at": failed, "gib_per_1k_tokens": round(per_token * 1024, 3),
            "note": note}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="*", default=[], help=f"row groups: {', '.join([*ROWS, *PACKED])}, maxseq")
    p.add_argument("--stacks", nargs="*", default=list(STACKS), choices=STACKS)
    p.add_argument("--one", nargs=4, metavar=("STACK", "ARCH", "BS", "SEQ"), help="a single run in this process")
    p.add_argument("--quant", default="", choices=["", "4bit"])
    p.add_argument("--repeat", type=int, default=1,
                   help="--rows: run each row's stacks this many times, alternating; the table shows each "
                        "stack's median run and the spread")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="--one: after the timed steps, profile two more: the top CUDA kernels, GPU busy time "
                        "against the step's, and where copies come from")
    p.add_argument("--no-compile", action="store_true", help="tunery: no torch.compile")
    p.add_argument("--no-offload", action="store_true", help="tunery: keep checkpointed block inputs on the GPU")
    p.add_argument("--no-lora", action="store_true", help="tunery: PEFT's LoRA forward instead of the fused op")
    p.add_argument("--no-groups", action="store_true", help="tunery: each LoRA projection alone, not q/k/v and "
                                                            "gate/up as one matmul with their adapters")
    p.add_argument("--no-graphs", action="store_true", help="tunery: run each step eagerly, not as a captured "
                                                            "CUDA graph")
    p.add_argument("--no-stash", action="store_true", help="tunery: recompute attention instead of keeping it in "
                                                           "pinned CPU memory")
    p.add_argument("--cpp-wrapper", action="store_true", help="experiment: inductor's C++ wrapper (fewer host "
                                                                "cycles per launched kernel)")
    p.add_argument("--skip-guards", action="store_true", help="experiment: after warm-up, dynamo evaluates only the "
                                                              "guards that tell its cache entries apart")
    p.add_argument("--ops", action="store_true", help="tunery: liger RMSNorm/SwiGLU swaps")
    p.add_argument("--packed", type=int, default=0, metavar="EXAMPLES",
                   help="--one: the row (bs 1) packs this many examples (tunery and hf)")
    p.add_argument("--no-varlen", action="store_true", help="tunery, packed rows: sdpa with transformers' "
                                                            "block-diagonal mask instead of varlen attention")
    p.add_argument("--memory", action="store_true", help="after the timed steps, one step under the allocator's "
                   "history: the tensors live at its peak memory and the code that allocated them")
    p.add_argument("--bnb-dequant", action="store_true", help="tunery: bitsandbytes' two dequantization ops "
                   "instead of kernels/nf4.py's one launch")
    p.add_argument("--output-fetch", choices=["block", "attention"], help="tunery: FastPathOptions.output_fetch")
    p.add_argument("--last-block-offloaded", action="store_true", help="tunery: the last block's input and "
                   "stash go to host memory too (FastPathOptions.last_block_on_gpu off)")
    a = p.parse_args()
    flags = [f for f in ("--no-compile", "--no-offload", "--no-lora", "--no-groups", "--no-stash", "--no-graphs",
                         "--no-varlen", "--ops", "--cpp-wrapper", "--skip-guards", "--bnb-dequant")
             if getattr(a, f[2:].replace("-", "_"))]
    flags += ["--last-block-offloaded"] if a.last_block_offloaded else []
    flags += ["--output-fetch", a.output_fetch] if a.output_fetch else []
    if a.bnb_dequant:
        from tunery.kernels import nf4

        nf4._triton_available = lambda: False
    if a.cpp_wrapper:
        import torch._inductor.config

        torch._inductor.config.cpp_wrapper = True
    if a.one:
        stack, arch, bs, seq = a.one
        opts = {"compile": not a.no_compile, "offload": not a.no_offload, "fused_lora": not a.no_lora,
                "lora_groups": not a.no_groups, "stash_attention": not a.no_stash, "liger_ops": a.ops,
                "cuda_graphs": not a.no_graphs, "varlen_attention": not a.no_varlen,
                "last_block_on_gpu": not a.last_block_offloaded, "output_fetch": a.output_fetch or "attention"}
        print(json.dumps(run_one(stack, arch, int(bs), int(seq), a.quant, steps=a.steps, warmup=a.warmup,
                                 fast_opts=opts if stack == "tunery" else None, profile=a.profile,
                                 skip_guards=a.skip_guards, memory=a.memory, packed=a.packed)), flush=True)
        return
    results = []
    for group in a.rows:
        if group == "maxseq":
            results += [_max_seq(s, "llama-8b", flags if s == "tunery" else []) for s in a.stacks if s != "hf"]
            continue
        if group in PACKED:  # tunery with and without varlen attention, and HF+PEFT
            arch, seq, examples = PACKED[group]
            packed = ["--packed", str(examples)]
            results += [_spawn(s, arch, 1, seq, "", a.steps, packed + (flags + more if s == "tunery" else []))
                        for s, more in (("tunery", []), ("tunery", ["--no-varlen"]), ("hf", []))]
            continue
        arch, bs, seq, quant = ROWS[group]
        runs = [_spawn(s, arch, bs, seq, quant, a.steps, flags if s == "tunery" else [])
                for _ in range(a.repeat) for s in a.stacks]  # stacks alternate: A B C A B C ...
        results += [_median_run([r for r in runs if r["stack"].split()[0] == s]) for s in a.stacks]
    print(_table(results))


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s of one stack's repeats, with every repeat's tokens/s beside it."""
    timed = sorted((r for r in runs if "tok_s" in r), key=lambda r: r["tok_s"])
    if not timed:
        return runs[-1]
    return {**timed[(len(timed) - 1) // 2], "repeats_tok_s": [r["tok_s"] for r in runs if "tok_s" in r]}


if __name__ == "__main__":
    main()
