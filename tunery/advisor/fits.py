"""Whether a job's predicted peak fits its flavor's GPU (`tunery submit` asks before queueing), and what would.

    check_fits(cfg, flavor, longest=1843)    # raises TuneryError when it cannot fit, naming what would
"""

from __future__ import annotations

import math

from tunery.advisor.memory import Peak, predict_peak
from tunery.advisor.shape import Shape, shape_for_model
from tunery.config import RunConfig
from tunery.errors import TuneryError
from tunery.jobs.flavors import Flavor, flavors


def job_peak(cfg: RunConfig, shape: Shape, seq: int, method: str | None = None, batch: int | None = None) -> Peak:
    """The predicted peak of `cfg`'s training step with rows of `seq` tokens: its method, batch and checkpointing;
    the fast path's offload and fused loss where they run (one process, a family that has them, not --no-fast)."""
    from tunery.models.catalog import family_of

    family = family_of(shape.model_type)
    fast = cfg.fast and cfg.gpus == 1 and family is not None
    return predict_peak(shape, method or cfg.method, batch or cfg.batch_size, seq, lora_r=cfg.lora_r,
                        lora_targets=cfg.lora_targets, checkpointing=cfg.gradient_checkpointing,
                        offload=fast and cfg.fast_path.offload,
                        fused_loss=fast and "fused_linear_ce" in family.pieces, optimizer=cfg.optimizer)


def check_fits(cfg: RunConfig, flavor: Flavor, longest: int | None = None) -> Peak | None:
    """Refuse (TuneryError) a job whose predicted peak exceeds one GPU of `flavor`; the peak, or None when there is
    nothing to check (a CPU flavor, a model whose config is not here)."""
    if not flavor.gpus:
        return None
    shape = shape_for_model(cfg.model)
    if shape is None:
        return None
    seq = min(cfg.max_seq_len, longest or cfg.max_seq_len)
    peak = job_peak(cfg, shape, seq)
    memory = flavor.memory_per_gpu_gib
    if peak.gib <= memory:
        return peak
    what = "full fine-tune" if cfg.method == "full" else cfg.method.upper()
    why = (f"{cfg.model} {what} needs {peak.describe()} at batch {cfg.batch_size} x {seq:,} tokens; {flavor.name} "
           f"has {flavor.memory_per_gpu_gb:g} GB a GPU ({memory:.1f} GiB)")
    raise TuneryError(f"{why}: {'; or '.join(_what_fits(cfg, shape, seq, flavor))}")


def _what_fits(cfg: RunConfig, shape: Shape, seq: int, flavor: Flavor) -> list[str]:
    """Changes that would fit, the nearest first: a smaller batch (same effective batch), gradient checkpointing,
    a leaner method, a bigger flavor."""
    memory, found = flavor.memory_per_gpu_gib, []
    for batch in (8, 4, 2, 1):
        if batch < cfg.batch_size and job_peak(cfg, shape, seq, batch=batch).gib <= memory:
            accum = math.ceil(cfg.batch_size * cfg.grad_accum / batch)
            found.append(f"--batch-size {batch} --grad-accum {accum} "
                         f"(~{job_peak(cfg, shape, seq, batch=batch).gib:.0f} GiB)")
            break
    if not cfg.gradient_checkpointing:
        ckpt = job_peak(cfg.replace(gradient_checkpointing=True), shape, seq)
        if ckpt.gib <= memory:
            found.append(f"gradient_checkpointing: true (~{ckpt.gib:.0f} GiB)")
    for method in ("lora", "qlora"):
        peak = job_peak(cfg, shape, seq, method=method)
        if method != cfg.method and peak.gib <= memory:
            found.append(f"method: {method} (--method {method}, ~{peak.gib:.0f} GiB)")
    bigger = [f for f in flavors().values() if f.gpus and job_peak(cfg, shape, seq).gib <= f.memory_per_gpu_gib]
    if bigger:
        found.append(f"--flavor {min(bigger, key=lambda f: f.usd_per_hour).name}")
    return found or ["no flavor has enough memory for it: train a smaller model"]
