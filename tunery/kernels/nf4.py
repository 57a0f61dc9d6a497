"""NF4 dequantization in one Triton kernel launch: the nested scales and the 4-bit codes together.

bitsandbytes dequantizes a nested NF4 weight in two ops: its 8-bit scales first (`dequantize_blockwise`, then the
offset added back), then the 4-bit codes (`dequantize_4bit`). Each op costs about 40 µs of host time, and a
Llama-3.1-8B QLoRA step makes 640 of each: on a slow host that dispatch bounds the step
(docs/benchmarks-history.md). This kernel computes the same values in one launch:

    scale[b] = code2[absmax[b]] * absmax2[b // blocksize2] + offset      (nested; else scale = absmax, fp32)
    w[2i], w[2i + 1] = nf4[packed[i] >> 4] * scale, nf4[packed[i] & 15] * scale      (b = 2i // blocksize)

in the same fp32 arithmetic, so the result equals bitsandbytes' bit for bit; `dequantize` falls back to
bitsandbytes' ops off CUDA, without Triton, and for other 4-bit types (FP4). The code book is bitsandbytes' own
(`get_4bit_type`). tests/kernels/test_nf4.py compares the two on random weights on the GPU.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

_BLOCK = 1024  # packed bytes per program: 2048 weights


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequantize(packed, absmax, absmax2, code2, offset, book, out, n_bytes, BLOCKSIZE: tl.constexpr,
                       BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = i < n_bytes
        byte = tl.load(packed + i, mask=inside, other=0).to(tl.int32)
        block = (2 * i) // BLOCKSIZE  # a byte's two weights share a block: block sizes are even
        if NESTED:
            q = tl.load(absmax + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(code2 + q, mask=inside, other=0.0) * tl.load(absmax2 + block // BLOCKSIZE2, mask=inside,
                                                                         other=0.0)
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=inside, other=0.0)
        high = tl.load(book + (byte >> 4)) * scale
        low = tl.load(book + (byte & 15)) * scale
        pair = tl.interleave(high, low).to(out.dtype.element_ty)  # weight 2i is the high half of byte i
        j = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out + j, pair, mask=j < 2 * n_bytes)

    return nf4_dequantize


@functools.cache
def _book(device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device=device).float().contiguous()


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def usable(packed: torch.Tensor, quant_type: str) -> bool:
    """Whether the fused kernel serves this weight (else bitsandbytes' ops do)."""
    return packed.is_cuda and quant_type == "nf4" and _triton_available()


def dequantize(packed, absmax, absmax2, code2, offset, layout, quant_type, qdtype) -> torch.Tensor:
    """The dense (rows, cols) weight in `qdtype`, as bitsandbytes' `dequantize_4bit` gives it."""
    blocksize, blocksize2, rows, cols = layout
    if not usable(packed, quant_type):
        if absmax2 is not None:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, absmax2, code2, blocksize2, torch.float32)
            absmax = absmax + offset
        return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, quant_type, [rows, cols], qdtype)
    out = torch.empty(rows, cols, dtype=qdtype, device=packed.device)
    n_bytes = rows * cols // 2
    nested = absmax2 is not None
    _kernel()[(-(-n_bytes // _BLOCK),)](
        packed, absmax, absmax2 if nested else absmax, code2 if nested else absmax,
        offset if nested else absmax, _book(packed.device), out, n_bytes,
        BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2 if nested else 1, NESTED=nested, BLOCK=_BLOCK)
    return out
