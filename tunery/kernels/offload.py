"""Activation checkpointing that keeps each block's input in pinned CPU memory instead of on the GPU.

Plain checkpointing keeps one (tokens, hidden) input per decoder block on the GPU and recomputes the block
in backward: for Llama-3.1-8B at 4096 tokens that is 32 x 32 MiB = 1 GiB held through the step. Here the
input is copied to pinned host memory on a side stream while the block computes (forward), and copied
back one block ahead of need (backward: fetching block i prefetches block i-1), so the copies overlap
compute and the GPU holds only the blocks in flight.

It plugs into transformers' own checkpointing hook (`_gradient_checkpointing_func` of each decoder layer),
so HF's layer code is unchanged; `enable_offload(model)` installs it, its undo puts plain checkpointing back.
The reference is `torch.utils.checkpoint`; tests compare gradients with it and with no checkpointing.

Attention kept, not recomputed (`stash_attention=True`). The recompute repeats the block's forward, and for
attention that is the q/k/v/o matmuls and the attention kernel: about a third of a Llama-3.1-8B block's recompute at
2048 tokens, more at long sequences. So each block's attention sublayer (`self_attn`: the projections with their
LoRA, RoPE, attention, the output projection) runs its first forward with grad, under `saved_tensors_hooks` that
copy every tensor its backward will read to pinned host memory on the side stream (storages copied once however many
tensors view them; parameters, the block's other inputs and tensors under `offload_keep_bytes` stay on the GPU by
reference; the sublayer's input is not copied: the recompute rebuilds it). Its autograd graph is kept until backward.
The recompute does not run the sublayer again: it returns its output, fetched back, and backward replays the kept graph.
The output is fetched one block ahead (`output_fetch`) and let go once the recompute has added it; the rest when the
block's backward starts, while its MLP recomputes. Blocks whose attention is a small share of their weights
(`stash_min_attention_share`) gain less than the stash costs and keep the recompute. Sublayers with 4-bit weights are
recomputed: on Llama-3.1-8B the stash made the QLoRA step 7% slower (docs/benchmarks-history.md). The
host link carries about four block inputs more per block (Llama-3.1-8B at 4096 tokens: 112 MiB forward and back); a
block stashes only while the whole model's stash fits in `stash_host_fraction` of the host's memory, otherwise it
recomputes as before.

The forward's last block keeps its input and stash on the GPU (`last_block_on_gpu`) when its input holds at most
`last_block_on_gpu_max_tokens` tokens: its backward comes right after the loss, so they would cross the link twice
only for backward to wait for them at its start (Llama-3.1-8B at 16k tokens: 14.5 ms of a 1.63 s step with the GPU
idle). They stay allocated through the loss instead. At 4,096 tokens that left every measured peak unchanged; at
16,384 it raised Llama-3.1-8B's by 0.06 GiB for a 0.4% faster step, and at 249,856 tokens (the longest-sequence
row) by about 1 GiB, so longer inputs go to the host as before. Running that block as plain autograd (no recompute)
was faster still on the small models but held its whole activations through the loss: +0.31 GiB at 16k tokens
(docs/benchmarks-history.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
import weakref

import torch

from tunery.kernels.dynamic import length_of, mark_length
from tunery.kernels.options import FastPathOptions, StepState


class _Offloader:
    """The host copies of the blocks' inputs in forward order, with the copy stream that moves them."""

    def __init__(self, layers: int = 0, stash: bool = False, rng: bool = True,
                 options: FastPathOptions | None = None, state: StepState | None = None):
        self.options = options or FastPathOptions()  # the tuning constants (offload_keep_bytes, stash_*, ...)
        self.state = state or StepState()  # shared with the fused LoRA layers (recomputing) and the attention
        self.pending: list[weakref.ref] = []  # slots awaiting backward; a graph that is dropped frees its own
        self._stream = None
        self._leaf: torch.Tensor | None = None
        self.layers, self.stash = layers, stash
        self.rng = rng  # whether the blocks draw random numbers (dropout): the recompute must replay them
        self.pool = HostPool()
        self.in_flight: list[torch.Tensor] = []  # GPU sources of this block's device-to-host copies
        self.blocks_in_flight: list[tuple[object, list[torch.Tensor]]] = []  # (copies-done event, sources) per block

    def block_done(self, device: torch.device) -> None:
        """A block's forward is queued with all its copies to the host: mark them, then let the compute stream wait
        for the block before's copies (they had this block's compute to run under) and let their sources go. Their
        memory is reused only after the copies have read it: what `record_stream` would do, but a captured CUDA graph
        can reuse such memory within the capture, where `record_stream`'s deferred frees cannot."""
        if not self.in_flight:
            return
        done = torch.cuda.Event()
        done.record(self._stream)
        self.blocks_in_flight.append((done, self.in_flight))
        self.in_flight = []
        while len(self.blocks_in_flight) > 1:
            event, _ = self.blocks_in_flight.pop(0)
            torch.cuda.current_stream(device).wait_event(event)

    def settle(self, device: torch.device) -> None:
        """Wait for every copy to the host issued so far and let their sources go (backward starts)."""
        if self.in_flight or self.blocks_in_flight:
            torch.cuda.current_stream(device).wait_stream(self._stream)
            self.in_flight, self.blocks_in_flight = [], []

    def join(self, device: torch.device) -> None:
        """The compute stream waits for everything on the copy stream (the end of a step: a CUDA graph capture
        must end with its side stream joined back)."""
        if self._stream is not None:
            torch.cuda.current_stream(device).wait_stream(self._stream)
        self.in_flight, self.blocks_in_flight = [], []

    def stash_fits(self, hidden: torch.Tensor) -> bool:
        """Whether every block's attention stash at this input size fits the host memory allowed for it."""
        need = self.options.stash_factor * hidden.numel() * hidden.element_size() * self.layers
        return self.stash and need <= self.options.stash_host_fraction * _host_memory()

    def stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def leaf(self, device: torch.device) -> torch.Tensor:
        """An empty tensor that requires grad: what makes a kept sublayer's graph record."""
        if self._leaf is None or self._leaf.device != device:
            self._leaf = torch.empty(0, device=device, requires_grad=True)
        return self._leaf


class HostPool:
    """Pinned host buffers, reused from step to step and never handed back to torch: a buffer a captured CUDA
    graph copies into must stay where it is for as long as the graph lives (kernels/graphs.py). Buffers are
    taken and given back in program order, and every copy into or out of them runs on the one copy stream, so
    a buffer given back after a copy was queued is reused only by copies queued after it."""

    def __init__(self, pin: bool = True):
        self.pin = pin
        self.free: dict[int, list[torch.Tensor]] = {}  # bytes -> free buffers of exactly that size
        self.held = 0  # bytes of pinned memory the pool owns

    def take(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 buffer of at least `nbytes`: a free one of that size, else the smallest larger free one,
        else a new one."""
        same = self.free.get(nbytes)
        if same:
            return same.pop()
        larger = [n for n, bufs in self.free.items() if n > nbytes and bufs]
        if larger:
            return self.free[min(larger)].pop()
        self.held += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buf: torch.Tensor | None) -> None:
        if buf is not None:
            self.free.setdefault(buf.numel(), []).append(buf)


def _to_host(t: torch.Tensor, owner: _Offloader) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a pinned host copy of `t`, the pool buffer that holds it), made on the side stream; `t` stays alive until
    the compute stream has waited for the transfer (`block_done`, `settle`). CPU (no stream): nothing to offload
    to, so a plain copy (and no buffer), and the code path is the same."""
    stream = owner.stream(t.device)
    if stream is None:
        return t.detach().clone(), None
    nbytes = t.numel() * t.element_size()
    buf = owner.pool.take(nbytes)
    host = buf[:nbytes].view(t.dtype).view(t.shape)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        host.copy_(t.detach(), non_blocking=True)
    owner.in_flight.append(t)
    return host, buf


def _to_device(host: torch.Tensor, device: torch.device, stream) -> tuple[torch.Tensor, object]:
    """`host` copied back to `device` on the side `stream`: (the copy, the event to wait for before reading it;
    None on CPU, where the host tensor itself is returned)."""
    if stream is None:
        return host, None
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        out.copy_(host, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return out, ready


class _Slot:
    """A block's input until its backward: in pinned host memory, or (`on_device`, the last block) where it is,
    as if already fetched."""

    def __init__(self, owner: _Offloader, hidden: torch.Tensor, on_device: bool = False):
        self.owner, self.device = owner, hidden.device
        self.fetched: torch.Tensor | None = hidden.detach() if on_device else None
        self.ready = None
        self.attention: _AttentionStash | None = None  # set when the block's attention was kept
        self.host, self.buffer = (None, None) if on_device else _to_host(hidden, owner)

    def prefetch(self) -> None:
        if self.attention is not None and self.owner.options.output_fetch == "block":
            self.attention.prefetch(self.attention.output_only)
        if self.fetched is None:
            self.fetched, self.ready = _to_device(self.host, self.device, self.owner.stream(self.device))

    def take(self) -> torch.Tensor:
        self.prefetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        out, self.fetched, self.host = self.fetched, None, None
        self.owner.pool.give(self.buffer)  # its copy back is queued: later copies into it come after
        self.buffer = None
        return out


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, offloader: _Offloader, run, hidden: torch.Tensor):
        # the recompute must draw the same dropout masks (reading the RNG state is not allowed in a CUDA graph
        # capture: kernels/graphs.py captures only models that draw none)
        ctx.rng = _rng_state(hidden.device) if offloader.rng else None
        offloader.pending = [r for r in offloader.pending if r() is not None]  # blocks awaiting backward
        tokens = hidden.numel() // max(hidden.shape[-1], 1)
        opts, state = offloader.options, offloader.state
        last = (opts.last_block_on_gpu and tokens <= opts.last_block_on_gpu_max_tokens  # the rest await backward
                and len(offloader.pending) == offloader.layers - 1)
        stash = _AttentionStash(offloader, hidden.device, last) if offloader.stash_fits(hidden) else None
        state.stash = stash
        try:
            with torch.no_grad():
                out = run(hidden)
        finally:
            state.stash = None
        ctx.run, ctx.slot = run, _Slot(offloader, hidden, last)
        offloader.block_done(hidden.device)
        ctx.slot.attention = stash if stash is not None and stash.anchor is not None else None
        offloader.pending.append(weakref.ref(ctx.slot))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        slot, owner = ctx.slot, ctx.slot.owner
        owner.settle(grad.device)  # the last block's input copy: its source need not live through backward
        hidden = slot.take().detach().requires_grad_(True)
        order = [r() for r in owner.pending]
        stash = slot.attention
        if slot in order:  # start fetching the block before this one while this one recomputes
            i = order.index(slot)
            owner.pending.pop(i)
            if i > 0 and order[i - 1] is not None:
                order[i - 1].prefetch()
                if stash is not None and order[i - 1].attention is not None:
                    stash.before = weakref.ref(order[i - 1].attention)
        if stash is not None:  # what its backward reads, while the MLP recomputes and runs backward
            stash.prefetch(range(len(stash.host)))  # (the output, fetched ahead but for the last block, is skipped)
        cuda = [hidden.device] if hidden.device.type == "cuda" else []
        state = owner.state
        rng = torch.random.fork_rng(devices=cuda, device_type="cuda") if ctx.rng else contextlib.nullcontext()
        with rng, torch.enable_grad():
            if ctx.rng:
                _set_rng_state(ctx.rng, hidden.device)
            state.recomputing, state.stash = True, stash
            try:
                out = ctx.run(hidden)
            finally:
                state.recomputing, state.stash = False, None
        torch.autograd.backward(out, grad)
        if not any(r() is not None for r in owner.pending):  # the first block: the step's last copies are done
            owner.join(hidden.device)
        return None, None, hidden.grad


class _AttentionStash:
    """One block's kept attention sublayer: its autograd graph, the tensors that graph saved (host copies,
    one per storage), its output, and the RNG state after it. See the module doc."""

    def __init__(self, owner: _Offloader, device: torch.device, on_device: bool = False):
        self.owner, self.device = owner, device
        self.on_device = on_device  # the last block: every saved tensor stays on the GPU by reference
        self.host: list[torch.Tensor | None] = []  # per storage: its bytes in (pinned) host memory
        self.buffers: list[torch.Tensor | None] = []  # per storage: the pool buffer under its host copy
        self.fetched: list[torch.Tensor | None] = []  # per storage: its bytes back on the device
        self.ready: list = []  # per storage: the event of its fetch
        self._seen: dict[int, tuple[int, torch.Tensor]] = {}  # while forward runs: storage address -> (index, tensor)
        self._keep: set[int] = set()  # storages saved by reference (parameters, the sublayer's other inputs)
        self.output_only: list[int] = []  # the storage of the sublayer's output: fetched one block ahead
        self.anchor = self._out = self._extra = self.rng = None
        self.input = self.grad = self.dx = None  # set during the replay
        self.before = None  # the previous block's stash, whose output is fetched during this one's backward
        self._input = (0, 0)  # the forward input's storage address and offset

    def keep_graph(self, module: torch.nn.Module, run, hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple:
        """The sublayer's first forward: run with grad under the saving hooks, keep its graph, return its outputs."""
        self._keep = _storages(module, args, kwargs)
        self._input = hidden.untyped_storage().data_ptr(), hidden.storage_offset()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            x = _Inlet.apply(hidden.detach(), self.owner.leaf(hidden.device), weakref.ref(self))
            outs = run(functools.partial(type(module).forward, module), x, *args, **kwargs)
            out = outs[0]
            self.anchor = _Anchor.apply(out, weakref.ref(self))
        self._out, self._extra = self.pack(out), tuple(outs[1:])
        self.output_only = [self._out[1]] if self._out[0] == "host" else []
        self._seen.clear()
        # the recompute's MLP must draw the forward's dropout masks
        self.rng = _rng_state(hidden.device) if self.owner.rng else None
        return (out.detach(), *self._extra)

    def replay(self, hidden: torch.Tensor) -> tuple:
        """The sublayer in the recompute: its kept output (no compute), wired to `hidden` for backward."""
        if self.rng is not None:
            _set_rng_state(self.rng, hidden.device)
        return (_Replay.apply(hidden, self), *self._extra)

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        address, view = storage.data_ptr(), (t.dtype, t.shape, t.stride(), t.storage_offset())
        if address == self._input[0]:
            return ("input", view)
        if self.on_device or address in self._keep or storage.nbytes() < self.owner.options.offload_keep_bytes:
            return ("keep", t)
        seen = self._seen.get(address)
        if seen is None:  # the tensor is held until forward ends: its address cannot be reused meanwhile
            seen = self._seen[address] = (len(self.host), t)
            host, buf = self._copy_out(t)
            self.host.append(host)
            self.buffers.append(buf)
            self.fetched.append(None)
            self.ready.append(None)
        return ("host", seen[0], view)

    def unpack(self, handle) -> torch.Tensor:
        if handle[0] == "keep":
            return handle[1]
        dtype, shape, stride, offset = handle[-1]
        if handle[0] == "input":
            base, offset = self.input, offset - self._input[1] + self.input.storage_offset()
        else:
            i = handle[1]
            self.prefetch([i])
            if self.ready[i] is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[i])
                self.ready[i] = None
            self.host[i] = None
            self._give(i)
            base = self.fetched[i]
        return torch.empty(0, dtype=dtype, device=base.device).set_(base.untyped_storage(), offset, shape, stride)

    def _copy_out(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The bytes of `t`'s whole storage, to the host: (the host copy, its pool buffer)."""
        flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        return _to_host(flat, self.owner)

    def _give(self, i: int) -> None:
        """Storage i's host buffer back to the pool, once its copy back is queued (or will never be)."""
        self.owner.pool.give(self.buffers[i])
        self.buffers[i] = None

    def prefetch(self, indexes) -> None:
        stream = self.owner.stream(self.device)
        for i in indexes:
            if self.fetched[i] is None and self.host[i] is not None:
                self.fetched[i], self.ready[i] = _to_device(self.host[i], self.device, stream)

    def output(self) -> torch.Tensor:
        """The kept output, once: its buffer then lives only as long as the recompute uses it (the residual add),
        not through the MLP's backward."""
        if self._out[0] == "keep":
            return self._out[1]
        out = self.unpack(self._out)
        self.fetched[self._out[1]] = None
        return out

    def release(self) -> None:
        self.anchor = self.input = self.grad = self.dx = self._out = None
        for i in range(len(self.buffers)):
            self._give(i)
        self.host, self.buffers, self.fetched, self.ready = [], [], [], []


def _storages(module: torch.nn.Module, args: tuple, kwargs: dict) -> set[int]:
    """Addresses of the storages a sublayer's graph may save by reference: its parameters and buffers (with
    bitsandbytes' 4-bit scales) and the tensors among its other inputs (RoPE's cos/sin, a mask)."""
    tensors = [*module.parameters(), *module.buffers()]
    for p in list(tensors):
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, *((state.state2.absmax, state.state2.code) if state.nested else ())]
    for a in (*args, *kwargs.values()):
        tensors += [t for t in (a if isinstance(a, (tuple, list)) else (a,)) if isinstance(t, torch.Tensor)]
    return {t.untyped_storage().data_ptr() for t in tensors}


class _Inlet(torch.autograd.Function):
    """The kept sublayer's input as the graph sees it: the gradient reaching it goes to the stash, and the graph
    holds no reference to the input's memory (a leaf would)."""

    @staticmethod
    def forward(ctx, x, leaf, stash):
        ctx.stash = stash
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.stash().dx = grad
        return None, None, None


class _Anchor(torch.autograd.Function):
    """A one-element root of the kept graph: holding it keeps the graph but not the sublayer's output; its
    backward hands on the gradient the replay received."""

    @staticmethod
    def forward(ctx, out, stash):
        ctx.stash = stash
        return out.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return ctx.stash().grad, None


class _Replay(torch.autograd.Function):
    """The sublayer in the recompute: forward returns the kept output; backward runs the kept graph with the
    recomputed input in place of the forward's, and returns the gradient that reached that input."""

    @staticmethod
    def forward(ctx, hidden, stash):
        ctx.stash = stash
        ctx.save_for_backward(hidden)
        return stash.output()

    @staticmethod
    def backward(ctx, grad):
        stash = ctx.stash
        stash.input, stash.grad = ctx.saved_tensors[0].detach(), grad
        before = stash.before() if stash.before is not None else None
        if before is not None and stash.owner.options.output_fetch == "attention":
            before.prefetch(before.output_only)
        torch.autograd.backward(stash.anchor, torch.zeros_like(stash.anchor))
        dx = stash.dx
        stash.release()
        return dx, None


def run_attention(forward, hidden, *args, **kwargs):
    """An attention sublayer's forward (`forward` is the module's bound method); compiled by kernels/ops.py."""
    return forward(hidden, *args, **kwargs)


@torch.compiler.disable  # the stash's hooks and kept graph live outside compiled code; the sublayer's run is compiled
def _stashing_attention(self, hidden_states, *args, **kwargs):
    state = self._tunery_state
    stash = state.stash
    if stash is None:  # not inside an offloaded block, or the block keeps no stash
        out = self._tunery_attention_run(functools.partial(type(self).forward, self), hidden_states, *args, **kwargs)
    elif state.recomputing:
        out = stash.replay(hidden_states)
    else:
        out = stash.keep_graph(self, self._tunery_attention_run, hidden_states, args, kwargs)
    n = length_of(hidden_states)
    if n is not None:  # the block's code after this graph break, where compiled, takes any length (kernels/dynamic.py)
        mark_length(out, n)
    return out


def _link_bytes_per_gflop(layer: torch.nn.Module) -> float:
    """Host-link bytes per GFLOP of a block's forward matmuls if its attention is stashed: per token, the block's
    input and the stash (q, k, v, attention out, output) in 16 bits, against 2 FLOPs a weight of its linears.
    q/k/v may be apart (Llama) or one linear (Phi-3's qkv_proj); the output projection is o_proj or out_proj."""
    linears = {}
    for name, m in layer.self_attn.named_children():
        m = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        if isinstance(m, torch.nn.Linear):
            linears[name] = m
    out = next((linears.pop(n) for n in ("o_proj", "out_proj") if n in linears), None)
    if out is None or not linears:
        return float("inf")  # a layout this estimate does not know: keep the recompute
    qkv = sum(m.out_features for m in linears.values())
    per_token = 2 * (2 * out.out_features + out.in_features + qkv)
    return per_token / (2 * _linear_weights(layer) / 1e9)


def _linear_weights(module: torch.nn.Module) -> int:
    """How many weights the base linears under `module` hold (a 4-bit weight counted by its dense shape)."""
    return sum(_weights(m.weight) for n, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in n)


def _weights(weight: torch.Tensor) -> int:
    state = getattr(weight, "quant_state", None)
    return weight.numel() if state is None else int(torch.Size(state.shape).numel())


def _attention_share(layer: torch.nn.Module) -> float:
    """The attention sublayer's share of the block's linear weights (of its matmul FLOPs at short sequences)."""
    return _linear_weights(layer.self_attn) / max(_linear_weights(layer), 1)


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def _why_not_stash(layers: list, attentions: list, opts: FastPathOptions) -> str | None:
    """Why these blocks keep recomputing their attention, or None when the stash pays for them."""
    if len(attentions) != len(layers):
        return "blocks without a self_attn sublayer"
    if any(hasattr(p, "quant_state") for a in attentions for p in a.parameters()):
        return "4-bit weights: slower with the stash on Llama-3.1-8B (docs/benchmarks-history.md)"
    link = _link_bytes_per_gflop(layers[0])
    if link > opts.stash_max_bytes_per_gflop:
        return (f"blocks too small to hide the host copies: {link / 1e3:.0f} kB per GFLOP, "
                f"more than {opts.stash_max_bytes_per_gflop / 1e3:.0f}")
    share = _attention_share(layers[0])
    if share < opts.stash_min_attention_share:
        return f"attention is {share:.0%} of a block's weights, under {opts.stash_min_attention_share:.0%}"
    return None


def draws_random(model: torch.nn.Module) -> bool:
    """Whether training `model` draws random numbers: a dropout module with p > 0 (PEFT's LoRA dropout among
    them) or a config's `*dropout` above 0 (attention dropout, applied inside the attention call)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    configs = [getattr(m, "config", None) for m in model.modules()]
    return any(isinstance(v, (int, float)) and v > 0 for c in configs if c is not None
               for k, v in vars(c).items() if k.endswith("dropout"))


def enable_offload(model, options: FastPathOptions, state: StepState) -> tuple[list[str], list]:
    """Switch the model's checkpointed layers to offloaded checkpointing; (what was done, undo callables).
    `options.stash_attention`: keep each block's attention sublayer (`self_attn`) instead of recomputing it.
    `state`: where the blocks say which one runs or recomputes (shared with kernels/lora.py's layers)."""
    stash_attention = options.stash_attention
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func") and type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        return [], []
    attentions = [m.self_attn for m in layers if isinstance(getattr(m, "self_attn", None), torch.nn.Module)]
    why_not = _why_not_stash(layers, attentions, options) if stash_attention else None
    stash = stash_attention and why_not is None
    offloader = _Offloader(len(layers), stash, rng=draws_random(model), options=options, state=state)
    undo = []
    for layer in layers:
        previous = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, offloader)
        undo.append(lambda m=layer, f=previous: setattr(m, "_gradient_checkpointing_func", f))
    done = [f"checkpointing with block inputs offloaded to pinned CPU memory x{len(layers)}"]
    if stash:
        for attention in attentions:
            attention._tunery_attention_run = run_attention
            attention._tunery_state = state
            attention.forward = types.MethodType(_stashing_attention, attention)
            undo.append(lambda m=attention: [delattr(m, a) for a in ("forward", "_tunery_attention_run",
                                                                     "_tunery_state")])
        done.append(f"attention kept for backward in pinned CPU memory, not recomputed x{len(layers)}")
    elif why_not:
        done.append(f"attention recomputed ({why_not})")
    return done, undo
