"""Pinned host <-> GPU copy bandwidth, alone and beside a GEMM on the compute stream: what an activation offload
can move during a block's forward. On the GPU machine:

    python bench/host_link.py            # sizes 32, 128, 512 MiB; prints one JSON line per size
"""

from __future__ import annotations

import json
import sys

import torch


def _gbps(nbytes: int, ms: float) -> float:
    return round(nbytes / ms / 1e6, 1)


def measure(mib: int, repeats: int = 10) -> dict:
    n = mib * 2**20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = {"mib": mib}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        for beside_gemm in (False, True):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(side):
                start.record(side)
                for _ in range(repeats):
                    dst.copy_(src, non_blocking=True)
                end.record(side)
            if beside_gemm:  # keep the compute stream busy for as long as the copies take
                for _ in range(4 * repeats):
                    a @ a
            torch.cuda.synchronize()
            out[f"{name}{'_beside_gemm' if beside_gemm else ''}_gbps"] = _gbps(n * repeats, start.elapsed_time(end))
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("host_link.py measures a CUDA GPU's host link; this machine has none")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for mib in (32, 128, 512):
        print(json.dumps(measure(mib)), flush=True)


if __name__ == "__main__":
    main()
