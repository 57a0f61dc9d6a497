"""Attention through cuDNN's fused SDPA kernel first: transformers' own sdpa path with another backend order.

PyTorch's `scaled_dot_product_attention` picks flash attention (FA2) first on CUDA. On the H100 cuDNN's fused
attention runs the same causal GQA shapes at 1.5-1.9x the speed, forward and backward
(`bench/sdpa_backends.py`; docs/benchmarks.md). `cudnn_first_attention` is transformers' sdpa attention
function called under `sdpa_kernel(PRIORITY, set_priority=True)`: inputs cuDNN cannot take (a mask it does
not support, an old GPU) fall through to flash, memory-efficient, then math, so the numbers are those of sdpa.

The fast path uses it on Hopper (compute capability 9.0) and newer, where it was measured; on older GPUs
sdpa keeps its own order. `use_cudnn_attention(model)` registers that function (and sdpa's mask builder)
under `NAME` with transformers' attention registries and switches the model instance to it; its undo
switches back to sdpa. Models that use another implementation (eager, flash_attention_2, flex) are left
alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "tunery_sdpa_cudnn"
PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def cudnn_first_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention (same arguments and outputs), cuDNN's kernel first."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with sdpa_kernel(PRIORITY, set_priority=True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, cudnn_first_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_cudnn_attention(model) -> tuple[list[str], list]:
    """Switch a model that uses sdpa to `cudnn_first_attention`; returns (what was done, undo callables)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return [], []
    _register()
    model.set_attn_implementation(NAME)
    return ["attention: sdpa with cuDNN's fused kernel first"], [lambda: model.set_attn_implementation("sdpa")]


def skipping_mask(build: Callable, skip: Callable[[dict], bool]) -> Callable:
    """transformers' mask builder `build`, building no mask (None: sdpa runs causal, or the caller's own kernel
    runs) for a call whose arguments satisfy `skip`: a dict of them bound by `build`'s signature, defaults filled
    in (q_length, kv_length, local_size, attention_mask, ...), however the call passes them. Else `build`'s mask.
    The signature is read once, not per call."""
    signature = inspect.signature(build)

    def mask(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return None if skip(bound.arguments) else build(*args, **kwargs)

    return mask
