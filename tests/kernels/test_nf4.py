"""The one-launch NF4 dequantization (kernels/nf4.py) against bitsandbytes' two ops, on the GPU; its fallback on
the CPU."""

from __future__ import annotations

import pytest
import torch


def _weight(rows, cols, nested, device, seed=0):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    dense = (torch.randn(rows, cols, generator=g) * 0.05).to(torch.bfloat16)
    return bnb.nn.Params4bit(data=dense, requires_grad=False, quant_type="nf4", compress_statistics=nested).to(device)


def _bitsandbytes(q):
    """What bitsandbytes' own ops give: the nested scales, then the codes."""
    blocksize, blocksize2, quant_type, shape, qdtype = q.meta
    absmax = q.absmax
    if q.absmax2 is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, q.absmax2, q.code2, blocksize2, torch.float32)
        absmax = absmax + q.offset
    return torch.ops.bitsandbytes.dequantize_4bit(q.packed, absmax, blocksize, quant_type, list(shape), qdtype)


def test_off_cuda_the_fallback_is_bitsandbytes_itself():
    from tunery.kernels import nf4
    from tunery.kernels.lora import _nf4_args, nf4_of

    for nested in (True, False):
        q = nf4_of(_weight(48, 32, nested, "cpu"))
        assert not nf4.usable(q.packed, "nf4")
        assert torch.equal(nf4.dequantize(*_nf4_args(q)), _bitsandbytes(q))


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1024, 4096), (896, 4864), (48, 32), (3, 1000)])
def test_one_launch_equals_bitsandbytes_gpu(shape, nested):
    from tunery.kernels import nf4
    from tunery.kernels.lora import _nf4_args, nf4_of

    q = nf4_of(_weight(*shape, nested, "cuda", seed=shape[0]))
    assert nf4.usable(q.packed, "nf4")
    got, expected = nf4.dequantize(*_nf4_args(q)), _bitsandbytes(q)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected), (got - expected).abs().max()
