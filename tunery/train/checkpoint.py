"""Checkpoints that resume a run exactly: trainable weights, optimizer, scheduler, RNG states, step.

Each checkpoint is written into `step-N.tmp/` and renamed to `step-N/` only when complete, so a run
killed mid-write keeps its previous checkpoint intact and never sees a half-written one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np

from tunery.errors import RunError

_PREFIX = "step-"


def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, keep: int) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{step:07d}"
    tmp = folder / f"{_PREFIX}{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "step": step}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and "." not in p.name]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore everything saved by `save_checkpoint`; returns the number of steps already done."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        raise RunError(f"checkpoint {path} does not match this model's trainable weights (was the config "
                       "changed since the run started?)")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    state = torch.load(path / "state.pt", weights_only=False)  # our own file: holds numpy RNG state
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])
