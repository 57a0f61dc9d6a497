"""Fused linear + cross-entropy against the plain PyTorch reference on random inputs (CPU here, CUDA on the
device: the `gpu` tests)."""

from __future__ import annotations

import pytest
import torch

from tunery.kernels.linear_ce import IGNORE, linear_cross_entropy, linear_cross_entropy_reference


def _inputs(n, h, v, dtype, device, weight_grad, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = IGNORE
    return hidden, weight, labels.to(device)


def _grads(fn, hidden, weight, labels):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
@pytest.mark.parametrize("softcap", [None, 1.5])  # logits are about N(0, 1): a cap of 1.5 bends most of them
def test_chunked_matches_reference_fp32(weight_grad, chunk, softcap):
    for seed in range(3):
        hidden, weight, labels = _inputs(53, 24, 301, torch.float32, "cpu", weight_grad, seed)
        ref = _grads(lambda h, w, y: linear_cross_entropy_reference(h, w, y, softcap), hidden, weight, labels)
        got = _grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=chunk, softcap=softcap), hidden, weight,
                     labels)
        assert torch.allclose(got[0], ref[0], rtol=1e-5)
        assert _rel(got[1], ref[1]) < 1e-5
        if weight_grad:
            assert _rel(got[2], ref[2]) < 1e-5
        else:
            assert got[2] is None


def test_softcap_changes_the_loss():
    hidden, weight, labels = _inputs(32, 24, 301, torch.float32, "cpu", False, 0)
    plain = linear_cross_entropy(hidden, weight, labels, chunk=8)
    capped = linear_cross_entropy(hidden, weight, labels, chunk=8, softcap=1.5)
    assert abs(float(capped) - float(plain)) > 1e-2 * abs(float(plain))


def test_all_ignored_rows_give_zero_loss_and_zero_grad():
    hidden, weight, labels = _inputs(16, 8, 50, torch.float32, "cpu", False, 0)
    labels[:] = IGNORE
    loss, gh, _ = _grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=5), hidden, weight, labels)
    assert float(loss) == 0.0 and float(gh.abs().max()) == 0.0


def test_scaled_upstream_gradient_is_applied():
    hidden, weight, labels = _inputs(20, 8, 40, torch.float32, "cpu", True, 1)
    h1 = hidden.detach().clone().requires_grad_()
    (linear_cross_entropy(h1, weight, labels, chunk=6) * 0.25).backward()
    h2 = hidden.detach().clone().requires_grad_()
    (linear_cross_entropy_reference(h2, weight, labels) * 0.25).backward()
    assert _rel(h1.grad, h2.grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("shape, softcap", [((4096, 2048, 128256), None), ((2048, 896, 151936), None),
                                           ((2048, 2304, 256000), 30.0)])  # the last: Gemma-2-2B's head
def test_chunked_matches_reference_bf16_on_cuda(shape, softcap):
    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU: run it on the device (pytest -m gpu)")
    n, h, v = shape
    hidden, weight, labels = _inputs(n, h, v, torch.bfloat16, "cuda", False, 0)
    ref = _grads(lambda x, w, y: linear_cross_entropy_reference(x, w, y, softcap), hidden, weight, labels)
    got = _grads(lambda x, w, y: linear_cross_entropy(x, w, y, softcap=softcap), hidden, weight, labels)
    assert _rel(got[0], ref[0]) < 1e-3
    assert _rel(got[1], ref[1]) < 1e-2
