"""Linear layer + cross-entropy without full-vocabulary logits.

The reference computes logits (tokens, vocab) and `F.cross_entropy`: for Qwen2.5 at bs 8 x 2048 tokens that
is 16k x 152k floats, 10 GB in fp32, held for backward. The fused version walks the tokens in chunks, and
for each chunk computes the logits, the loss and the gradient with respect to the hidden states (and the
weight, when it trains) at once, keeping only those gradients for backward: memory is one chunk of logits
plus (tokens, hidden). Summed over labelled tokens; `ignore_index` rows contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
_CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MB in fp32; the chunk's peak is ~3x that)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of CE over labelled rows: hidden (N, H), weight (V, H), labels (N,)."""
    logits = (hidden @ weight.t()).float()  # (N, V): lm_head in the model's dtype, loss in fp32 (as HF does)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            valid = y != IGNORE
            if not bool(valid.any()):
                continue
            logits = (h @ weight.t()).float()  # (C, V)
            lse = torch.logsumexp(logits, dim=-1)
            target = y.clamp(min=0)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            # d loss / d logits = softmax - onehot(label), zero on ignored rows; in place over the logits
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(y), device=y.device), target] -= 1.0
            grad_logits *= valid[:, None]
            grad_logits = grad_logits.to(weight.dtype)
            del logits
            grad_hidden[start : start + chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_grad = grad_weight is not None
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = (grad_weight * grad_out).to(grad_hidden.dtype) if ctx.weight_grad else None
        return gh, gw, None, None


def chunk_rows(vocab: int) -> int:
    return max(16, min(8192, _CHUNK_ELEMENTS // max(vocab, 1)))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         impl: str = "chunked", chunk: int | None = None) -> torch.Tensor:
    """Sum of CE of `hidden @ weight.T` against `labels`; impl "chunked" (fused) or "reference"."""
    if impl == "reference":
        return linear_cross_entropy_reference(hidden, weight, labels)
    return _ChunkedLinearCE.apply(hidden, weight, labels, chunk or chunk_rows(weight.shape[0]))
