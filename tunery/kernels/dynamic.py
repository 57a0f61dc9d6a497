"""Sequence lengths marked dynamic for torch.compile before the compiled code first sees them.

A run on variable-length data meets many lengths. Left to itself, dynamo compiles each region static for the
first length and again, with the length symbolic, at the second ("automatic dynamic"): two compiles a region.
Marking the length dimension dynamic up front makes the first compile the only one. The marks go on tensors
outside compiled code: a block's inputs as its checkpoint hook hands them on (kernels/ops.py), and an attention
sublayer's inputs and outputs beside the graph break its stash makes (kernels/offload.py), so the code that
resumes after the break sees marked tensors too.
"""

from __future__ import annotations

import functools

import torch

from tunery.kernels.varlen import BOUNDS


def mark_length(value, length: int) -> None:
    """Mark every dimension of `length` elements in the tensors of `value` (nested in tuples, lists, dicts and
    partials) dynamic for torch.compile, so the code they enter compiles for any sequence length from its first
    call, not static first and again at the second length; a packed row's `doc_bounds` (one more than its
    examples) too. Marked outside compiled code (a block's inputs as its checkpoint hook hands them on; an
    attention sublayer's inputs and output beside the graph break its stash makes), the code after a graph
    break sees the marks too."""
    if isinstance(value, torch.Tensor):
        for d, size in enumerate(value.shape):
            if size == length:
                torch._dynamo.maybe_mark_dynamic(value, d)
    elif isinstance(value, (tuple, list)):
        for v in value:
            mark_length(v, length)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k == BOUNDS and isinstance(v, torch.Tensor):  # a packed row's example bounds: their count varies too
                torch._dynamo.maybe_mark_dynamic(v, 0)
            else:
                mark_length(v, length)
    elif isinstance(value, functools.partial):
        mark_length(value.args, length)
        mark_length(value.keywords, length)


def length_of(hidden) -> int | None:
    """The sequence length of a block's hidden states (batch, length, width); None for anything else."""
    return hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[1] > 1 else None
