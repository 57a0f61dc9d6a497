"""How to add a rank-r LoRA term to a frozen base matmul on the GPU: time each layout on one block's shapes.

    python bench/lora_layouts.py            # llama-1b, llama-8b and qwen-0.5b shapes; one JSON line per case

The layouts, for a group of projections sharing their input x (N, in) (q/k/v, gate/up) or one alone:
- "add": each projection's rank-r product writes its output, the base matmul adds into it (beta=1): what
  kernels/lora.py does per layer. Its output is written twice and read once more.
- "kcat": one matmul over K = in + R (R: the group's summed ranks), [x | s x A^T] @ [W | B]^T, the base weights
  and the adapters' B in one (out + R, in + R) buffer; backward likewise, [dy | s dy B] @ [W ; A].
  "kcat+copy" counts the copy that widens x (or dy) into its buffer; without it, the producer wrote there.
  "kcat_split": one matmul per projection over the same [x | s x A^T] (rows of the shared buffer).
- "chain" (backward): the group's rank-r products write dx, then each base matmul adds into it (beta=1).
- "base": the base matmuls alone, no adapter: the floor.
Times are CUDA-event medians of 20 calls after 5 warm-up calls, in microseconds.
"""

from __future__ import annotations

import json
import statistics

import torch

SHAPES = {  # name: (tokens per step, hidden, intermediate, q width, kv width)
    "llama-1b": (8192, 2048, 8192, 2048, 512),
    "llama-8b": (4096, 4096, 14336, 4096, 1024),
    "qwen-0.5b": (16384, 896, 4864, 896, 128),
}
R = 16


def _time(fn, reps: int = 20) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _group(n: int, width: int, outs: list[int], dev="cuda", dt=torch.bfloat16):
    """Inputs of one group: x, per member (W, A, B), and the kcat buffer S holding them all."""
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g) * 0.02  # noqa: E731
    x = rnd(n, width)
    ws = [rnd(o, width) for o in outs]
    as_ = [rnd(R, width) for _ in outs]
    bs = [rnd(o, R) for o in outs]
    total, rr = sum(outs), R * len(outs)
    s = torch.zeros(total + rr, width + rr, device=dev, dtype=dt)
    row = 0
    for i, (w, a, b) in enumerate(zip(ws, as_, bs)):
        s[row:row + w.shape[0], :width] = w
        s[row:row + w.shape[0], width + i * R:width + (i + 1) * R] = b
        s[total + i * R:total + (i + 1) * R, :width] = a
        row += w.shape[0]
    return x, ws, as_, bs, s


def forward_cases(n, width, outs):
    x, ws, as_, bs, s = _group(n, width, outs)
    scale, total, rr = 2.0, sum(outs), R * len(outs)
    a_all = torch.cat(as_)
    fwd_w = s[:total]  # (total, width + rr)
    xcat = torch.empty(n, width + rr, device="cuda", dtype=x.dtype)
    w_all = torch.cat(ws)

    def add():
        for w, a, b in zip(ws, as_, bs):
            ((x @ a.t()) @ b.t()).addmm_(x, w.t(), beta=scale)

    def kcat(copy: bool, split: bool = False):
        def run():
            if copy:
                xcat[:, :width].copy_(x)
            torch.mm(xcat[:, :width], a_all.t(), out=xcat[:, width:])
            xcat[:, width:].mul_(scale)
            if not split:
                return xcat @ fwd_w.t()
            row = 0
            for o in outs:
                xcat @ fwd_w[row:row + o].t()
                row += o
        return run

    def base():
        for w in ws:
            x @ w.t()

    ref = [x @ w.t() + scale * ((x @ a.t()) @ b.t()) for w, a, b in zip(ws, as_, bs)]
    got = kcat(True)()
    cols = [sum(outs[:i]) for i in range(len(outs) + 1)]
    err = max((got[:, cols[i]:cols[i + 1]].float() - r.float()).abs().max().item() for i, r in enumerate(ref))
    return {"add": _time(add), "kcat+copy": _time(kcat(True)), "kcat": _time(kcat(False)),
            "kcat_split+copy": _time(kcat(True, True)), "base": _time(base),
            "base_fused": _time(lambda: x @ w_all.t()), "max_abs_err": err}


def backward_cases(n, width, outs):
    """dx of the group: sum over members of dy_i W_i + s (dy_i B_i) A_i."""
    x, ws, as_, bs, s = _group(n, width, outs)
    scale, total, rr = 2.0, sum(outs), R * len(outs)
    g = torch.randn(n, total, device="cuda", dtype=x.dtype) * 0.02
    gs = [g[:, sum(outs[:i]):sum(outs[:i + 1])].contiguous() for i in range(len(outs))]
    gcat = torch.empty(n, total + rr, device="cuda", dtype=x.dtype)
    bwd_w = s[:, :width]  # (total + rr, width)

    def add():
        dx = None
        for gi, w, a, b in zip(gs, ws, as_, bs):
            gb = (gi @ b).mul_(scale)
            d = (gb @ a).addmm_(gi, w)
            dx = d if dx is None else dx.add_(d)
        return dx

    def kcat(copy: bool):
        def run():
            col = 0
            for i, (gi, b) in enumerate(zip(gs, bs)):
                if copy:
                    gcat[:, col:col + gi.shape[1]].copy_(gi)
                torch.mm(gcat[:, col:col + gi.shape[1]], b, out=gcat[:, total + i * R:total + (i + 1) * R])
                col += gi.shape[1]
            gcat[:, total:].mul_(scale)
            return gcat @ bwd_w
        return run

    def chain():
        gb = torch.cat([(gi @ b) for gi, b in zip(gs, bs)], 1).mul_(scale)
        dx = gb @ torch.cat(as_)
        row = 0
        for gi in gs:
            dx.addmm_(gi, bwd_w[row:row + gi.shape[1]])
            row += gi.shape[1]
        return dx

    def base():
        dx = None
        for gi, w in zip(gs, ws):
            dx = gi @ w if dx is None else dx.addmm_(gi, w)

    ref = add()
    got, chained = kcat(True)(), chain()
    return {"add": _time(add), "kcat+copy": _time(kcat(True)), "kcat": _time(kcat(False)), "chain": _time(chain),
            "base": _time(base), "max_abs_err": max((got.float() - ref.float()).abs().max().item(),
                                                     (chained.float() - ref.float()).abs().max().item())}


def main() -> None:
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for name, (n, h, inter, q, kv) in SHAPES.items():
        groups = {"qkv": (h, [q, kv, kv]), "o": (q, [h]), "gate_up": (h, [inter, inter]), "down": (inter, [h])}
        for group, (width, outs) in groups.items():
            for kind, fn in (("forward", forward_cases), ("backward_dx", backward_cases)):
                row = {"shape": name, "group": group, "pass": kind, "tokens": n}
                row.update({k: round(v, 1) if k != "max_abs_err" else v for k, v in fn(n, width, outs).items()})
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
