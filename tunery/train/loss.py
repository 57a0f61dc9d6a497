"""Token-level loss: the training objective and the held-out measure share this code."""

from __future__ import annotations

import math

from tunery.data.tokenize import IGNORE, Tokenized
from tunery.train.batching import DOC_BOUNDS, SEQ_IDX, collate, trained_tokens


def summed_loss(model, batch: dict, fast=None):
    """Sum of next-token cross-entropy over label tokens of `batch` (a scalar tensor).

    `batch` is padded (attention_mask, from `collate`) or packed (position_ids and no attention_mask, from
    `pack_batch`). With a `fast` path (tunery.kernels.apply.FastPath) the loss is fused with the lm_head and
    full logits are never built; otherwise the reference: logits, then cross-entropy.
    """
    import torch.nn.functional as F

    from tunery.kernels.varlen import reads_bounds

    # no KV cache: a loss never reuses one, and with a cache transformers ignores the document boundaries
    # that position_ids mark in a packed batch (it builds a plain causal mask)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if DOC_BOUNDS in batch and reads_bounds(model):  # a packed row's example bounds, for varlen attention
        inputs[DOC_BOUNDS] = batch[DOC_BOUNDS]
    if SEQ_IDX in batch:  # each token's example, for convolutions bounded at example starts (models/packing.py)
        inputs[SEQ_IDX] = batch[SEQ_IDX]
    if fast is not None and fast.applied:
        from tunery.kernels.linear_ce import linear_cross_entropy

        hidden = fast.decoder(**inputs, use_cache=False).last_hidden_state
        return linear_cross_entropy(hidden[:, :-1].flatten(0, 1), fast.lm_head.weight,
                                    batch["labels"][:, 1:].flatten(), softcap=fast.softcap)
    logits = model(**inputs, use_cache=False).logits
    # (batch, seq-1, vocab) against (batch, seq-1): predict token t+1 from position t
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def held_out_loss(model, sequences: list[Tokenized], pad_id: int, device: str, batch_size: int = 8,
                  on_batch=None) -> dict:
    """Mean loss per label token and its perplexity over `sequences` (model put in eval mode); `on_batch()` is
    called after each batch (progress)."""
    import torch

    if not sequences:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = collate(sequences[start : start + batch_size], pad_id, device)
            total += float(summed_loss(model, batch))
            count += trained_tokens(batch)
            if on_batch is not None:
                on_batch()
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
