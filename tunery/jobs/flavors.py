"""Hardware flavors (data in flavors.yaml) and the time/cost estimate shown before a job starts."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunery.errors import TuneryError

# Measured anchor: LoRA SFT tokens/s on one H100 (docs/architecture.md, performance targets: HF+PEFT rows, seq 2048), by
# model size in billions of parameters. Other GPUs scale by their bf16 TFLOP/s.
_H100_TOKENS_PER_S = ((0.5, 33_400), (1.2, 23_700), (8.0, 5_800))
# A CPU: its measured fp32 matmul rate, of which a training step uses about this share (6 FLOPs per parameter
# and token, forward and backward)
_CPU_EFFICIENCY = 0.25


@dataclass(frozen=True)
class Flavor:
    name: str
    gpus: int
    gpu: str | None
    gpu_memory_gb: int
    usd_per_hour: float
    tflops_bf16: float
    memory_bandwidth_gbs: float = 0.0  # one GPU's (advisor/speed.py); 0 where unknown

    @property
    def memory_per_gpu_gb(self) -> float:
        """One GPU's memory: what one data-parallel process may use (the table's gpu_memory_gb is the total)."""
        return self.gpu_memory_gb / self.gpus if self.gpus else 0.0

    @property
    def memory_per_gpu_gib(self) -> float:
        """One GPU's memory in GiB, what a predicted peak is held to: the table's GB read as 10^9 bytes (an A10G's
        "24 GB" is 22.5 GiB to CUDA; an H100's "80 GB" has a little more than this, so the check errs safe)."""
        return self.memory_per_gpu_gb * 1e9 / 2**30


@functools.cache
def flavors() -> dict[str, Flavor]:
    raw = yaml.safe_load((Path(__file__).with_name("flavors.yaml")).read_text())
    return {name: Flavor(name=name, **values) for name, values in raw.items()}


def get_flavor(name: str) -> Flavor:
    table = flavors()
    if name not in table:
        raise TuneryError(f"unknown flavor {name!r}; known: {', '.join(table)}")
    return local_flavor() if name == "local" else table[name]


@functools.cache
def local_flavor() -> Flavor:
    """This machine, as the `local` flavor: its GPUs (their bf16 rate from the table by name, or measured when
    the name is not in it) or, without one, its CPU, measured (no charge either way)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        known = {f.gpu: f.tflops_bf16 for f in flavors().values() if f.gpu}
        tflops = next((v for gpu, v in known.items() if gpu.lower() in name.lower()), None)
        if tflops is None:
            tflops = _matmul_tflops(torch, "cuda", torch.bfloat16) / 0.7  # a measured rate is ~70% of the peak
        memory = torch.cuda.get_device_properties(0).total_memory // 2**30
        return Flavor("local", torch.cuda.device_count(), name, memory, 0.0, tflops)
    return Flavor("local", 0, None, 0, 0.0, _matmul_tflops(torch, "cpu", torch.float32))


def _matmul_tflops(torch, device: str, dtype) -> float:
    """Dense matmul TFLOP/s measured for about 0.2 s."""
    import time

    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    a @ a
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ a
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * 1024**3 * n / (time.perf_counter() - start) / 1e12


def parse_duration(text: str) -> int:
    """'90' / '90s' / '30m' / '4h' / '1d' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text).lower())
    if not match:
        raise TuneryError(f"cannot read duration {text!r}: use e.g. 90s, 30m, 4h")
    seconds = int(float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]])
    if seconds < 1:  # 0 would read as "no timeout" further on: say so instead of doing it
        raise TuneryError(f"a timeout of {text!r} is under one second; leave --timeout out for none")
    return seconds


def money(usd: float) -> str:
    """Dollars as a person reads them: cents, but never "$0.00" for an amount that is not zero."""
    if usd == 0 or abs(usd) >= 0.01:
        return f"${usd:,.2f}"
    return f"${usd:.2g}"


def parse_money(text: str) -> float:
    """'5usd' / '$5' / '5' / '2.5 USD' -> 5.0"""
    match = re.fullmatch(r"\s*\$?\s*(\d+(?:\.\d+)?)\s*(usd)?\s*", str(text).lower())
    if not match:
        raise TuneryError(f"cannot read budget {text!r}: use e.g. 5usd or $5")
    return float(match[1])


def tokens_per_second(params_b: float, flavor: Flavor) -> float:
    """Estimated training throughput for a model of `params_b` billion parameters on `flavor`."""
    if not flavor.gpus:  # a CPU: measured for `local` (cpu-basic and cpu-upgrade: about 2 cores of this kind)
        tflops = flavor.tflops_bf16 or 0.13
        return tflops * 1e12 * _CPU_EFFICIENCY / (6 * max(params_b, 1e-6) * 1e9)
    anchor = _interpolate(params_b)
    return anchor * flavor.tflops_bf16 / 989 * flavor.gpus * (0.85 if flavor.gpus > 1 else 1.0)


def _interpolate(params_b: float) -> float:
    """H100 tokens/s at `params_b`, linear in 1/size between anchors (throughput ~ 1/FLOPs per token)."""
    pts = _H100_TOKENS_PER_S
    if params_b <= pts[0][0]:
        return pts[0][1] * pts[0][0] / max(params_b, 1e-3)
    for (s0, t0), (s1, t1) in zip(pts, pts[1:]):
        if params_b <= s1:
            w = (1 / params_b - 1 / s1) / (1 / s0 - 1 / s1)
            return t1 + w * (t0 - t1)
    return pts[-1][1] * pts[-1][0] / params_b


@dataclass(frozen=True)
class Estimate:
    tokens: int
    params_b: float
    tokens_per_s: float
    seconds: float
    usd: float
    flavor: str

    def describe(self) -> str:
        hours = self.seconds / 3600
        span = f"{self.seconds / 60:.0f} min" if hours < 1 else f"{hours:.1f} h"
        return (f"estimate (rough, from a throughput table): {self.tokens:,} tokens on {self.flavor} at "
                f"~{self.tokens_per_s:,.0f} tok/s for a {self.params_b:.2g}B model -> ~{span}, ~{money(self.usd)}")


def estimate(tokens: int, params_b: float, flavor: Flavor, tokens_per_s: float | None = None) -> Estimate:
    """Time and cost of `tokens` on `flavor`: at `tokens_per_s` (the advisor's time model, advisor/speed.py,
    where the model's config is known), else at the size table's rate."""
    tps = tokens_per_s or tokens_per_second(params_b, flavor)
    startup = 10 if flavor.name == "local" else 120  # remote: image pull, model download, load
    seconds = tokens / max(tps, 1e-9) + startup
    return Estimate(tokens, params_b, tps, seconds, seconds / 3600 * flavor.usd_per_hour, flavor.name)
