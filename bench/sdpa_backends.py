"""Scaled-dot-product attention, forward + backward, per backend on the shapes of the benchmark rows.

Which kernel `F.scaled_dot_product_attention` picks decides the attention time of every row (most of the
step at long context). On the GPU machine:

    python bench/sdpa_backends.py

Prints one line per (shape, backend): milliseconds for forward and for forward + backward, and TFLOP/s
(causal: half the 4 * seq^2 * head_dim * heads of full attention forward, 2.5x that for backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # name: (batch, heads, kv heads, seq, head dim)
    "llama-8b bs2": (2, 32, 8, 2048, 128),
    "llama-8b 16k": (1, 32, 8, 16384, 128),
    "llama-1b bs4": (4, 32, 8, 2048, 64),
    "qwen-0.5b bs8": (8, 14, 2, 2048, 64),
    "qwen-7b bs2": (2, 28, 4, 2048, 128),
}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _time(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    for name, (b, h, kv, s, d) in SHAPES.items():
        q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, kv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        g = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
        flops = 2 * b * h * s * s * d  # causal forward
        for backend, which in BACKENDS.items():
            for gqa in (True, False):
                kk, vv = (k, v) if gqa else (k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1))

                def fwd(q=q, kk=kk, vv=vv, gqa=gqa):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

                try:
                    with sdpa_kernel([which]):
                        f_ms = _time(fwd)
                        fb_ms = _time(lambda fwd=fwd, g=g: torch.autograd.backward(fwd(), g))
                except RuntimeError as e:
                    print(f"{name:14s} {backend:9s} gqa={gqa!s:5s} unavailable: {str(e).splitlines()[0][:80]}")
                    continue
                print(f"{name:14s} {backend:9s} gqa={gqa!s:5s} fwd {f_ms:7.2f} ms ({flops / f_ms / 1e9:5.0f} TFLOP/s)"
                      f"  fwd+bwd {fb_ms:7.2f} ms ({3.5 * flops / fb_ms / 1e9:5.0f} TFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
