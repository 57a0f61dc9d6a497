"""Step time and run time on a flavor's GPU, from throughput measured on an H100 (advisor/recorded.py).

    tps = tokens_per_second(shape, flavor, method="lora", seq=2048)

A LoRA step's useful work is 4 FLOPs a matmul weight a token (forward, and backward to the inputs) plus causal
attention; the H100 rows give the share of the GPU's bf16 peak that tunery reaches on it (more on bigger models:
small ones are bound by the host and the memory traffic around each matmul), interpolated by model size. On
another GPU the same share of its bf16 peak (the flavors table), and no faster than its memory bandwidth lets
the weights be read three times a step (forward, recompute, backward). QLoRA runs at the measured 4-bit row's
ratio to its bf16 row; a full fine-tune does the weights' gradients too (6 FLOPs a weight a token).
"""

from __future__ import annotations

import functools
import math

from tunery.advisor.shape import Shape
from tunery.jobs.flavors import Flavor

H100_BF16_TFLOPS = 989.0
_CPU_EFFICIENCY = 0.25  # a CPU's measured fp32 matmul rate, the share a training step uses of it
_STARTUP_S = {"local": 10.0}  # load and warm-up; remote: image pull, model download, load
_REMOTE_STARTUP_S = 120.0


def flops_per_token(shape: Shape, seq: int, method: str = "lora") -> float:
    matmul = shape.block_linear_params + shape.vocab * shape.hidden
    per_weight = 6 if method == "full" else 4
    return per_weight * matmul + 3 * 2 * shape.layers * seq * shape.hidden


@functools.cache
def _calibration() -> tuple[tuple[float, float], ...]:
    """(log params, share of the H100's bf16 peak) of each bf16 H100 row at 2k tokens, by size."""
    from tunery.advisor.recorded import RECORDED
    from tunery.advisor.shape import shape_of
    from tunery.models.catalog import bench_shapes

    points = {}
    for r in RECORDED:
        if r.gpu == "H100" and not r.quant and r.seq == 2048:
            model_type, _, values = bench_shapes()[r.shape]
            shape = shape_of(model_type, values)
            points[shape.params] = r.tok_s * flops_per_token(shape, r.seq) / (H100_BF16_TFLOPS * 1e12)
    return tuple(sorted((math.log(p), share) for p, share in points.items()))


@functools.cache
def _qlora_ratio() -> float:
    from tunery.advisor.recorded import RECORDED

    by_row = {r.row: r.tok_s for r in RECORDED}
    return by_row["llama-8b-4bit"] / by_row["llama-8b"]


def gpu_share(params: int) -> float:
    """The share of a GPU's bf16 peak a LoRA step reaches on a model of `params` parameters."""
    points, x = _calibration(), math.log(params)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def tokens_per_second(shape: Shape, flavor: Flavor, method: str = "lora", seq: int = 2048, batch: int = 1) -> float:
    """Training tokens a second for `shape` on `flavor` (all its GPUs, data-parallel)."""
    flops = flops_per_token(shape, seq, method)
    if not flavor.gpus:  # a CPU: measured for `local` (cpu-basic and cpu-upgrade: about 2 cores of this kind)
        return (flavor.tflops_bf16 or 0.13) * 1e12 * _CPU_EFFICIENCY / flops
    share = gpu_share(shape.params) * (_qlora_ratio() if method == "qlora" else 1.0)
    seconds_a_token = flops / (share * flavor.tflops_bf16 * 1e12)
    if flavor.memory_bandwidth_gbs:  # the weights read 3 times a step of batch x seq tokens
        weight_bytes = shape.params * (0.6 if method == "qlora" else 2.0)
        seconds_a_token = max(seconds_a_token, 3 * weight_bytes / (flavor.memory_bandwidth_gbs * 1e9) / (batch * seq))
    return flavor.gpus * (0.85 if flavor.gpus > 1 else 1.0) / seconds_a_token


def run_seconds(tokens: int, shape: Shape, flavor: Flavor, method: str = "lora", seq: int = 2048,
                batch: int = 1) -> float:
    """Wall time of a run that trains `tokens` tokens, start-up included."""
    startup = _STARTUP_S.get(flavor.name, _REMOTE_STARTUP_S)
    return tokens / tokens_per_second(shape, flavor, method, seq, batch) + startup
