"""`tunery doctor`: what this machine has for fine-tuning, a newcomer's first check."""

from __future__ import annotations

import os
import platform

from rich.table import Table

from tunery.progress import report as console
from tunery.run import package_version

_CORE = ("tunery", "torch", "transformers", "peft", "datasets", "tokenizers", "safetensors", "accelerate")
_OPTIONAL = {"bitsandbytes": "4-bit QLoRA", "liger-kernel": "fused GPU kernels", "gguf": "GGUF export",
             "llama-cpp-python": "GGUF quantize/verify"}


def doctor_command() -> None:
    """Versions, torch/CUDA, GPU name and memory, bf16 support, and where tunery keeps its files."""
    import torch

    from tunery.paths import tunery_home

    table = Table(title="tunery doctor", show_header=False)
    table.add_row("python", platform.python_version())
    for pkg in _CORE:
        table.add_row(pkg, package_version(pkg) or "[red]missing[/]")
    for pkg, use in _OPTIONAL.items():
        table.add_row(pkg, package_version(pkg) or f"[dim]not installed ({use})[/]")
    table.add_row("CUDA available", str(torch.cuda.is_available()))
    if torch.cuda.is_available():
        table.add_row("CUDA (torch build)", str(torch.version.cuda))
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            table.add_row(f"GPU {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB")
        table.add_row("bf16 supported", str(torch.cuda.is_bf16_supported()))
    else:
        table.add_row("training device", f"CPU ({os.cpu_count()} cores), fp32: fine for tiny models and the demo")
    table.add_row("TUNERY_HOME", str(tunery_home()))
    table.add_row("Hub access", "offline (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1"
                  else "allowed (set HF_HUB_OFFLINE=1 to forbid)")
    console.print(table)
