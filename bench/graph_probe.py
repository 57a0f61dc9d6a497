"""Which part of the fast path stops a CUDA graph capture of the training step (kernels/graphs.py): each variant
(fast-path pieces switched off one at a time) in its own process, on a small random Llama, two eager steps then
one capture, with the failing call's Python stack.

    python bench/graph_probe.py [--hidden 1024 --layers 2 --seq 512] [--quant 4bit]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback

VARIANTS = {
    "all": {},
    "no-compile": {"compile": False},
    "no-offload": {"offload": False},
    "no-stash": {"stash_attention": False},
    "no-lora": {"fused_lora": False},
    "no-fast": None,
}


def probe(variant: str, hidden: int, layers: int, seq: int, quant: str, mode: str) -> dict:
    import tempfile

    import torch
    import transformers

    from tunery.config import RunConfig
    from tunery.kernels.apply import FastPath, fast_path_for
    from tunery.kernels.graphs import capture_context
    from tunery.kernels.options import FastPathOptions
    from tunery.models.catalog import family_of_model
    from tunery.models.load import load_model, pick_device
    from tunery.train.loop import make_trainable
    from tunery.train.loss import summed_loss

    pick_device("cuda")
    stash_always = {"stash_max_bytes_per_gflop": float("inf"), "offload_keep_bytes": 0}  # small blocks stash too
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=2)
    torch.manual_seed(0)
    if quant:
        path = tempfile.mkdtemp()
        transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
        model = load_model(path, "cuda", torch.bfloat16, four_bit=True)
    else:
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = make_trainable(model, RunConfig(method="qlora" if quant else "lora", lora_dropout=0.0,
                                            gradient_checkpointing=True))
    opts = VARIANTS[variant]
    fast = FastPath() if opts is None else fast_path_for(model, "cuda", family_of_model(model),
                                                         FastPathOptions(**stash_always, **opts), checkpointing=True)
    ids = torch.randint(0, 32000, (2, seq), device="cuda")
    batch = {"input_ids": ids, "labels": ids}

    def step():
        loss = summed_loss(model, batch, fast)
        loss.backward()
        return loss.detach()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with capture_context(fast.state), torch.cuda.graph(graph, capture_error_mode=mode):
            loss = step()
        graph.replay()
        torch.cuda.synchronize()
        return {"variant": variant, "ok": True, "loss": float(loss)}
    except Exception as e:  # noqa: BLE001 - the point is to see it
        frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}: {f.line}"
                  for f in traceback.extract_tb(e.__traceback__)][-14:]
        return {"variant": variant, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}", "stack": frames}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--quant", default="")
    p.add_argument("--mode", default="global", choices=["global", "thread_local", "relaxed"])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--one")
    a = p.parse_args()
    if a.one:
        print(json.dumps(probe(a.one, a.hidden, a.layers, a.seq, a.quant, a.mode)), flush=True)
        return
    for v in a.variants:
        cmd = [sys.executable, __file__, "--one", v, "--hidden", str(a.hidden), "--layers", str(a.layers),
               "--seq", str(a.seq), "--quant", a.quant, "--mode", a.mode]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"variant": v, "crashed": out.stderr[-1500:]}), flush=True)
        logs = [line for line in out.stderr.splitlines() if "ecompil" in line or "guard" in line.lower()]
        print("\n".join(logs[-12:]), flush=True)


if __name__ == "__main__":
    main()
