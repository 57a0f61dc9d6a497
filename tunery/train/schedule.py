"""Warmup then cosine / linear / constant learning-rate multipliers."""

from __future__ import annotations

import math


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
