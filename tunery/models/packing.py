"""Packed rows through models that mix neighbouring tokens by convolution: LFM2's short convolutions, bounded at
each example's start.

A packed row (train/batching.pack_batch) holds several examples back to back. Attention keeps them apart (the
positions restart; varlen attention or transformers' block-diagonal mask), but an LFM2 short-convolution block
mixes each token with the K - 1 tokens before it (a causal depthwise convolution, K = `conv_L_cache`, 3 in the
released models), so the first tokens of an example would read the last ones of the example packed before it.
transformers hands the convolution a `seq_idx` (each token's example number, the causal-conv1d kernel's
argument), but its own fallback, which runs wherever that kernel is not installed, ignores it.

`bound_convolutions(model)` gives each such block a forward that, given `seq_idx`, drops every tap reaching
into another example: the output at token t sums w[j] * x[t - j] over the taps j whose token t - j belongs to
t's example. Without `seq_idx` (padded rows, evaluation) or with a cache (generation) the block runs
transformers' forward unchanged. The reference is each example run alone through transformers' own forward
(tests/train/test_packing.py).
"""

from __future__ import annotations

import types

BOUNDED = "_tunery_bounded_forward"  # the block's forward as transformers defined it, kept on a bounded block


def boundable(module) -> bool:
    """Whether `module` is a short-convolution block this module can bound: LFM2's (in_proj -> B, C, x;
    B * x through a depthwise causal Conv1d; C * that; out_proj)."""
    import torch

    conv = getattr(module, "conv", None)
    return (type(module).__name__ == "Lfm2ShortConv" and isinstance(conv, torch.nn.Conv1d)
            and conv.groups == conv.in_channels == conv.out_channels and hasattr(module, "in_proj")
            and hasattr(module, "out_proj"))


def convolves(model) -> bool:
    """Whether `model` has short-convolution blocks this module bounds."""
    return any(boundable(m) for m in model.modules())


def bound_convolutions(model) -> int:
    """Bound every short-convolution block of `model` at example boundaries (see the module's text); returns how
    many of its blocks are bounded, those bounded by an earlier call (left as they are) included."""
    count = 0
    for module in model.modules():
        if boundable(module):
            if not hasattr(module, BOUNDED):
                setattr(module, BOUNDED, module.forward)
                module.forward = types.MethodType(_bounded_forward, module)
            count += 1
    return count


def _bounded_forward(self, hidden_states, *args, seq_idx=None, **kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values", args[0] if args else None))
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if seq_idx is None or cache is not None or mask is not None:  # not a packed row: transformers' forward
        extra = {} if seq_idx is None else {"seq_idx": seq_idx}
        return getattr(self, BOUNDED)(hidden_states, *args, **kwargs, **extra)
    b, c, x = self.in_proj(hidden_states).transpose(-1, -2).chunk(3, dim=-2)
    mixed = bounded_causal_conv(b * x, self.conv.weight, self.conv.bias, seq_idx)
    return self.out_proj((c * mixed).transpose(-1, -2).contiguous())


def bounded_causal_conv(x, weight, bias, seq_idx):
    """A depthwise causal convolution of `x` (batch, channels, tokens) by `weight` (channels, 1, K) that reads no
    token of another example: what `F.conv1d(x, weight, bias, padding=K - 1, groups=channels)[..., :tokens]`
    computes, less the taps where `seq_idx` (batch, tokens) differs between the token and the one it reads."""
    import torch.nn.functional as F

    dtype, x = x.dtype, x.to(weight.dtype)
    k, n = weight.shape[-1], x.shape[-1]
    taps = weight[:, 0, :]  # (channels, K): tap K - 1 reads the token itself, tap K - 1 - j the token j before
    out = x * taps[:, k - 1, None]
    for j in range(1, k):
        before = F.pad(x, (j, 0))[..., :n]
        same = (F.pad(seq_idx, (j, 0), value=-1)[..., :n] == seq_idx).unsqueeze(1)
        out = out + (before * same) * taps[:, k - 1 - j, None]
    if bias is not None:
        out = out + bias[:, None]
    return out.to(dtype)
