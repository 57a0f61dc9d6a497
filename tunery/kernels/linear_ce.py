"""Linear layer + cross-entropy without full-vocabulary logits.

The reference computes logits (tokens, vocab) and `F.cross_entropy`: for Qwen2.5 at bs 8 x 2048 tokens that
is 16k x 152k floats, 10 GB in fp32, held for backward. The fused version walks the tokens in chunks, and
for each chunk computes the logits, the loss and the gradient with respect to the hidden states (and the
weight, when it trains) at once, keeping only those gradients for backward: memory is one chunk of logits
plus (tokens, hidden). Summed over labelled tokens; `ignore_index` rows contribute nothing. `softcap` is Gemma 2's
final logit soft-capping (logits -> softcap * tanh(logits / softcap)), applied inside the chunk.

Per chunk, the loss and d loss / d logits are one function of the (chunk, vocab) logits (`_ce_chunk`). On
CUDA it runs compiled: one pass for the log-sum-exp and one that writes the gradient in the logits' dtype,
instead of a dozen eager fp32 passes over the chunk (cast, logsumexp, exp, one-hot, mask, cast back),
which on a 152k vocabulary cost more than the lm_head matmul itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
_CHUNK_ELEMENTS = 2**25  # logits per chunk (64 MB in bf16; the chunk's peak is about twice that)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   softcap: float | None = None) -> torch.Tensor:
    """Sum of CE over labelled rows: hidden (N, H), weight (V, H), labels (N,)."""
    logits = hidden @ weight.t()  # (N, V): lm_head and soft-capping in the model's dtype, loss in fp32 (as HF does)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


def _ce_chunk(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE, d CE / d logits) of one chunk: logits (C, V) in the model dtype, labels (C,); fp32 inside."""
    x = logits.float()
    if softcap:
        capped = torch.tanh(x / softcap)
        x = capped * softcap
    valid = labels != IGNORE
    target = labels.clamp(min=0)
    lse = torch.logsumexp(x, dim=-1)  # (C,)
    picked = x.gather(1, target[:, None]).squeeze(1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]  # (C, V), never materialised
    grad = (torch.exp(x - lse[:, None]) - onehot.to(x.dtype)) * valid[:, None].to(x.dtype)  # compiled
    if softcap:
        grad = grad * (1 - capped * capped)  # d(softcap tanh(z / softcap)) / dz
    return loss, grad.to(logits.dtype)


_compiled_chunk = None


def _chunk_fn(device: torch.device):
    """The compiled chunk function on CUDA (compiled once per process), the eager one elsewhere."""
    global _compiled_chunk
    if device.type != "cuda":
        return _ce_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_ce_chunk)  # the last, shorter chunk makes the row count dynamic
    return _compiled_chunk


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                softcap: float | None) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_chunk = _chunk_fn(hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            loss, grad_logits = ce_chunk(h @ weight.t(), y, softcap)  # (C, V) logits in, (C, V) gradient out
            total += loss
            torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk])
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
        return gh, gw, None, None, None


def chunk_rows(vocab: int) -> int:
    return max(16, min(8192, _CHUNK_ELEMENTS // max(vocab, 1)))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         impl: str = "chunked", chunk: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Sum of CE of `hidden @ weight.T` (soft-capped when `softcap`) against `labels`; impl "chunked" (fused) or
    "reference"."""
    if impl == "reference":
        return linear_cross_entropy_reference(hidden, weight, labels, softcap)
    return _ChunkedLinearCE.apply(hidden, weight, labels, chunk or chunk_rows(weight.shape[0]), softcap)
