"""Data-parallel training on several processes (torchrun + DDP): NCCL on GPUs, gloo on CPU.

`tunery train --gpus N` re-launches itself under `python -m torch.distributed.run`; inside, each rank
trains on its share of every optimizer step's examples and gradients are summed across ranks, so the
loss curve is the one a single process with N times the batch would draw.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> Dist:
    """This process's place in a torchrun launch (a single process outside one)."""
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init(dist: Dist, device: str) -> str:
    """Join the process group; returns this rank's device ('cuda:<local rank>' on GPUs)."""
    import torch
    import torch.distributed as td

    if not dist.enabled or td.is_initialized():
        return device
    if device == "cuda":
        torch.cuda.set_device(dist.local_rank)
        td.init_process_group("nccl")
        return f"cuda:{dist.local_rank}"
    td.init_process_group("gloo")
    return device


def all_sum(value: float, dist: Dist) -> float:
    if not dist.enabled:
        return value
    import torch
    import torch.distributed as td

    tensor = torch.tensor([float(value)], dtype=torch.float64)
    td.all_reduce(tensor)
    return float(tensor.item())


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


def shutdown(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def launch(n: int, args: list[str]) -> int:
    """Run `tunery ARGS` as `n` torchrun processes on this host; returns the launcher's exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "tunery.cli.app", *args]
    return subprocess.call(cmd)
