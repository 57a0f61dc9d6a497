"""LoRA SFT step throughput and peak GPU memory: tunery's training step vs a plain HF+PEFT step.

Random-init models from public architecture configs (speed and memory do not depend on weight values),
LoRA r=16 on all linear layers of the blocks, random token batches, labels on every token.

    python bench/lora_bench.py --arch qwen-0.5b --bs 8 --seq 2048 --gc --stack tunery
    python bench/lora_bench.py --matrix            # every row of docs/benchmarks.md, one process per row

Prints one JSON line per run: tok_s, tflops (useful LoRA FLOP/s), peak_gib. Unsloth rows come from
../shared/tools/reference_lora_bench.py run in the same device call (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

ARCHS = {  # public config.json values of each model
    "llama-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                     rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "llama-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "qwen-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                      rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "qwen-7b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                    rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)),
}
MATRIX = [("llama-1b", 4, 2048), ("qwen-0.5b", 8, 2048), ("llama-8b", 2, 2048), ("qwen-7b", 2, 2048)]


def build(arch: str, gc: bool, stack: str):
    import torch
    import transformers

    from tunery.models.lora import apply_lora

    cls_name, kw = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = apply_lora(model, r=16, alpha=32, dropout=0.0)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, cfg


def step_fn(model, stack: str, ops: bool = False, compile: bool = False):
    from tunery.eval.loss import summed_loss
    from tunery.kernels.apply import fast_path_for

    fast = fast_path_for(model, "cuda", enabled=stack == "tunery", ops=ops, compile=compile)
    print(fast.describe(), file=sys.stderr)

    def tunery_step(batch):
        n = int((batch["labels"][:, 1:] != -100).sum())
        (summed_loss(model, batch, fast) / n).backward()

    def hf_step(batch):
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()

    return hf_step if stack == "hf" else tunery_step


def run(arch: str, bs: int, seq: int, gc: bool, stack: str, steps: int = 10, warmup: int = 3, ops: bool = False,
        compile: bool = False) -> dict:
    import torch

    model, cfg = build(arch, gc, stack)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, cfg.vocab_size, (bs, seq), device="cuda")
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    step = step_fn(model, stack, ops, compile)
    torch.cuda.reset_peak_memory_stats()
    times, err = [], None
    try:
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(batches[i % 4])
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        err = "OOM"
    name = stack + ("+ops" if ops else "") + ("+compile" if compile else "")
    res = {"stack": name, "arch": arch, "bs": bs, "seq": seq, "gc": gc, "err": err,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if times:  # warm-up steps absorb compilation
        med = sorted(times)[len(times) // 2]
        n_total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        n_mat = n_total - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
        flops_tok = 4 * n_mat + 3 * 2 * cfg.num_hidden_layers * seq * cfg.hidden_size
        tok_s = bs * seq / med
        res.update(step_s=round(med, 4), tok_s=round(tok_s), tflops=round(tok_s * flops_tok / 1e12, 1))
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen-0.5b", choices=sorted(ARCHS))
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--gc", action="store_true", help="activation checkpointing")
    p.add_argument("--stack", default="tunery", choices=["tunery", "tunery-ref", "hf"],
                   help="tunery: fast path; tunery-ref: tunery's loop on the reference path; hf: model(labels)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ops", action="store_true", help="tunery: liger RMSNorm/SwiGLU swaps")
    p.add_argument("--compile", action="store_true", help="tunery: torch.compile each block (the trainer's default)")
    p.add_argument("--matrix", action="store_true", help="run every MATRIX row for both stacks")
    a = p.parse_args()
    if not a.matrix:
        print(json.dumps(run(a.arch, a.bs, a.seq, a.gc, a.stack, a.steps, ops=a.ops, compile=a.compile)), flush=True)
        return
    for arch, bs, seq in MATRIX:
        for stack in ("hf", "tunery-ref", "tunery"):
            cmd = [sys.executable, __file__, "--arch", arch, "--bs", str(bs), "--seq", str(seq), "--gc",
                   "--stack", stack, "--steps", str(a.steps)]
            subprocess.run(cmd, check=False)  # one process per row: peak memory is per process


if __name__ == "__main__":
    main()
