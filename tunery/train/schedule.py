"""The optimizer (`make_optimizer`), and warmup then cosine / linear / constant learning-rate multipliers."""

from __future__ import annotations

import math


def make_optimizer(params: list, kind: str, lr: float, weight_decay: float):
    """torch's AdamW (`adamw`) or bitsandbytes' 8-bit AdamW (`adamw_8bit`: both moments quantized blockwise to 8
    bits with their own scales, TRL's `optim="adamw_8bit"`; tensors under 4,096 elements keep 32-bit moments).
    setup has run `check_packages` before loading anything."""
    import torch

    if kind == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_multiplier(step: int, total: int, warmup: int, kind: str) -> float:
    """Factor on the peak lr for 0-based `step` of `total` optimizer steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
