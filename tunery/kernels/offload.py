"""Activation checkpointing that keeps each block's input in pinned CPU memory instead of on the GPU.

Plain checkpointing keeps one (tokens, hidden) input per decoder block on the GPU and recomputes the block
in backward: for Llama-3.1-8B at 4096 tokens that is 32 x 32 MiB = 1 GiB held through the step. Here the
input is copied to pinned host memory on a side stream while the block computes (forward), and copied
back one block ahead of need (backward: fetching block i prefetches block i-1), so the copies overlap
compute and the GPU holds only the blocks in flight.

It plugs into transformers' own checkpointing hook (`_gradient_checkpointing_func` of each decoder layer),
so HF's layer code is unchanged; `enable_offload(model)` installs it, its undo puts plain checkpointing back.
The reference is `torch.utils.checkpoint`; tests compare gradients with it and with no checkpointing.
"""

from __future__ import annotations

import functools
import weakref

import torch

# True while a block is being recomputed in backward: layers whose output backward never reads skip their
# base matmul then (kernels/lora.py). A plain module global, so compiled code guards on it.
RECOMPUTING = False


class _Offloader:
    """The host copies of the blocks' inputs in forward order, with the copy stream that moves them."""

    def __init__(self):
        self.pending: list[weakref.ref] = []  # slots awaiting backward; a graph that is dropped frees its own
        self._stream = None

    def stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream


class _Slot:
    def __init__(self, owner: _Offloader, hidden: torch.Tensor):
        self.owner, self.device, self.dtype, self.shape = owner, hidden.device, hidden.dtype, hidden.shape
        self.fetched: torch.Tensor | None = None
        self.ready = None
        stream = owner.stream(hidden.device)
        if stream is None:  # CPU: nothing to offload to; keep a copy so the code path is the same
            self.host = hidden.detach().clone()
            return
        self.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(stream):
            self.host.copy_(hidden.detach(), non_blocking=True)
        hidden.record_stream(stream)  # the GPU copy stays alive until the transfer is done

    def prefetch(self) -> None:
        if self.fetched is not None:
            return
        stream = self.owner.stream(self.device)
        if stream is None:
            self.fetched = self.host
            return
        self.fetched = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.fetched.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self) -> torch.Tensor:
        self.prefetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        out, self.fetched, self.host = self.fetched, None, None
        return out


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, offloader: _Offloader, run, hidden: torch.Tensor):
        ctx.rng = _rng_state(hidden.device)  # the recompute must draw the same dropout masks
        with torch.no_grad():
            out = run(hidden)
        ctx.run, ctx.slot = run, _Slot(offloader, hidden)
        offloader.pending = [r for r in offloader.pending if r() is not None] + [weakref.ref(ctx.slot)]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        slot, owner = ctx.slot, ctx.slot.owner
        hidden = slot.take().detach().requires_grad_(True)
        order = [r() for r in owner.pending]
        if slot in order:  # start fetching the block before this one while this one recomputes
            i = order.index(slot)
            owner.pending.pop(i)
            if i > 0 and order[i - 1] is not None:
                order[i - 1].prefetch()
        cuda = [hidden.device] if hidden.device.type == "cuda" else []
        global RECOMPUTING
        with torch.random.fork_rng(devices=cuda, device_type="cuda"), torch.enable_grad():
            _set_rng_state(ctx.rng, hidden.device)
            RECOMPUTING = True
            try:
                out = ctx.run(hidden)
            finally:
                RECOMPUTING = False
        torch.autograd.backward(out, grad)
        return None, None, hidden.grad


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def offloaded_checkpoint(offloader: _Offloader, run, hidden: torch.Tensor, *args):
    """transformers' checkpoint hook: `run(hidden, *args)` with its input offloaded and the block recomputed."""
    if args:  # extra positional inputs stay in the closure; only `hidden` moves
        run = functools.partial(_call_with, run, args)
    return _OffloadedBlock.apply(offloader, run, hidden)


def _call_with(run, args, hidden):
    return run(hidden, *args)


def enable_offload(model) -> tuple[list[str], list]:
    """Switch the model's checkpointed layers to offloaded checkpointing; (what was done, undo callables)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func") and type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        return [], []
    offloader = _Offloader()
    undo = []
    for layer in layers:
        previous = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, offloader)
        undo.append(lambda m=layer, f=previous: setattr(m, "_gradient_checkpointing_func", f))
    return [f"checkpointing with block inputs offloaded to pinned CPU memory x{len(layers)}"], undo
