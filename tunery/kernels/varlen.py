"""A packed row's attention as variable-length flash attention: each example attends to itself only, and no
(row x row) mask is built.

A packed micro-batch (train/batching.pack_batch) is one row holding several examples back to back, with
`doc_bounds` (int32: 0, where each example ends, the row's length) beside its restarting position_ids. Given
only the position_ids, transformers' sdpa path keeps the examples apart with a block-diagonal mask it builds
over the whole row: memory quadratic in the row's length, and a masked kernel that computes every (query, key)
pair of the row, across examples too. Under the implementation this module registers, the mask builder builds
no mask for such a row and the attention function runs torch's varlen attention (`torch.nn.attention.varlen`,
flash attention over the examples, each causal, within a layer's sliding window if it has one). Rows with a
mask (padded evaluation, generation), or with a window the row reaches where torch's kernel takes no window
(2.9-2.10), keep sdpa and transformers' mask, as do models this cannot serve (`varlen_problem`).

Invariant: a packed row's forward carries its `doc_bounds` (train/loss.summed_loss passes them to a model that
`reads_bounds`). A packed row without them would get causal attention over the whole row here.

The reference is sdpa with the dense mask: tests/kernels/test_varlen.py compares the two on random inputs on
the GPU, and on the CPU (which has no varlen kernel) checks the plumbing through a stand-in kernel that runs
sdpa example by example.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

NAME = "tunery_varlen"  # the fallback for rows it does not serve: transformers' sdpa
NAME_CUDNN = "tunery_varlen_cudnn"  # the fallback: sdpa with cuDNN's kernel first (kernels/attention.py)
BOUNDS = "doc_bounds"  # the packed batch's key and the forward's keyword


def _kernel():
    """torch's varlen attention, or None where this torch has none (before 2.9)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@dataclass(frozen=True)
class Plan:
    """How to call `kernel`, read once from its signature (none is read per call: the call runs compiled).
    torch has had two: `is_causal=` (2.9-2.10; no scale, no GQA) and `window_size=` (later releases)."""

    kernel: Callable
    causal: tuple  # the keyword that makes it causal, and its value
    scale: bool  # takes `scale=`
    gqa: bool  # takes `enable_gqa=`; else key/value heads are repeated for the query heads that share them
    window: bool  # takes a sliding window (`window_size=`); else rows a window reaches keep sdpa's mask

    @classmethod
    def of(cls, kernel: Callable) -> Plan:
        params = inspect.signature(kernel).parameters
        if "window_size" in params:
            causal = ("window_size", (-1, 0))  # causal, no window
        elif "is_causal" in params:
            causal = ("is_causal", True)
        else:
            raise RuntimeError("torch's varlen_attn takes neither window_size nor is_causal: an unknown release")
        return cls(kernel, causal, "scale" in params, "enable_gqa" in params, "window_size" in params)


def varlen_call(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, max_len: int,
                scale: float | None, window: int | None = None) -> torch.Tensor:
    """Causal attention of each example (between consecutive `bounds`) in (tokens, heads, dim) tensors; with
    `window`, each query sees its last `window` positions, itself included (transformers' sliding window)."""
    kw = dict([plan.causal])
    if window is not None and window < max_len:
        if not plan.window:
            raise RuntimeError(f"this torch's varlen_attn has no sliding window, and {window} is under the row")
        kw["window_size"] = (window - 1, 0)
    if scale is not None and plan.scale:
        kw["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6 * scale:
        raise RuntimeError(f"this torch's varlen_attn has no scale argument and the model scales by {scale}")
    if k.shape[1] != q.shape[1]:
        if plan.gqa:
            kw["enable_gqa"] = True
        else:  # query heads share key/value heads: give each its copy
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return plan.kernel(q, k, v, bounds, bounds, max_len, max_len, **kw)


def _attention(fallback, plan: Plan, module, query, key, value, attention_mask, dropout: float = 0.0,
               scaling: float | None = None, **kwargs):
    """transformers' attention signature: query (1, heads, row, dim), key/value (1, kv heads, row, dim). With
    the row's `doc_bounds` and no mask, varlen attention; otherwise `fallback` (sdpa) unchanged."""
    bounds = kwargs.pop(BOUNDS, None)
    if bounds is None or attention_mask is not None:
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise RuntimeError(f"a packed batch is one row; got {query.shape[0]} rows with {BOUNDS}")
    if dropout:
        raise RuntimeError("varlen attention here runs without attention dropout; set attention_dropout 0")
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (row, heads, dim)
    out = varlen_call(plan, q, k, v, bounds, query.shape[2], scaling, kwargs.get("sliding_window"))
    return out[None], None  # (1, row, heads, dim), as transformers' attention functions return


def _varlen_skip(build: Callable, plan: Plan) -> Callable:
    """sdpa's mask builder `build`, building none where the varlen path runs: no padding mask, queries over all
    keys (no cache), no extra mask function a model adds (transformers then asks for `use_vmap`), and no local
    window the keys reach unless the kernel takes windows. Else `build`'s mask, which sends the row to sdpa.
    (kernels/graphs.py's `_eager_skip` is the same wrapper with its own rule.)"""
    from tunery.kernels.attention import skipping_mask

    def skips(a: dict) -> bool:
        q, kv, local = a.get("q_length"), a.get("kv_length"), a.get("local_size")
        window_ok = local is None or kv < local or plan.window
        return a.get("attention_mask") is None and q == kv and window_ok and not a.get("use_vmap")

    return skipping_mask(build, skips)


def _register(plan: Plan) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from tunery.kernels.attention import cudnn_first_attention

    for name, fallback in ((NAME, sdpa_attention_forward), (NAME_CUDNN, cudnn_first_attention)):
        AttentionInterface.register(name, functools.partial(_attention, fallback, plan))
        AttentionMaskInterface.register(name, _varlen_skip(sdpa_mask, plan))


def reads_bounds(model) -> bool:
    """Whether `model` runs this module's attention, whose packed rows need their `doc_bounds` (and only then
    does a forward get them: a model's own forward may take no such keyword)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in (NAME, NAME_CUDNN)


def varlen_problem(model) -> str | None:
    """Why packed rows of `model` cannot run varlen attention here, or None."""
    kernel = _kernel()
    if kernel is None:
        return f"torch {torch.__version__} has no varlen attention (torch.nn.attention.varlen, 2.9 and later)"
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"the model runs {impl} attention, not sdpa"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout is on"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim > 256:
        return f"flash attention takes heads up to 256 wide, not {head_dim}"
    weight = next(model.parameters())
    if getattr(kernel, "__module__", "") == "torch.nn.attention.varlen":  # not a test's stand-in
        if weight.device.type != "cuda":
            return "varlen attention runs on CUDA only"
        if weight.dtype not in (torch.float16, torch.bfloat16):
            return "flash attention runs in 16 bits; the model is in 32"
    try:
        plan = Plan.of(kernel)
    except RuntimeError as e:
        return str(e)
    if not plan.scale:
        scales = {float(m.scaling) for m in model.modules() if isinstance(getattr(m, "scaling", None), float)}
        if any(abs(scale - head_dim ** -0.5) > 1e-6 * scale for scale in scales):
            return "this torch's varlen_attn has no scale argument, and the model scales attention its own way"
    return None


def use_varlen_attention(model, cudnn: bool = False) -> tuple[list[str], list]:
    """Switch `model` (sdpa) to varlen attention for packed rows; returns (what was done, undo callables).
    `cudnn`: rows it does not serve run sdpa with cuDNN's kernel first (kernels/attention.py)."""
    if varlen_problem(model):
        return [], []
    _register(Plan.of(_kernel()))
    model.set_attn_implementation(NAME_CUDNN if cudnn else NAME)
    return (["attention: packed rows through varlen flash attention, each example on its own"],
            [lambda: model.set_attn_implementation("sdpa")])
