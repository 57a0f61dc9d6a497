"""A micro-batch's forward and backward as one CUDA graph, captured per batch shape and replayed.

On one GPU the engine's 7-8B step is bound by the host, not the GPU: Python dispatch of the compiled blocks,
the LoRA ops and autograd takes about 335 ms to queue a Llama-3.1-8B step whose kernels keep the GPU busy
for about 290 (docs/benchmarks-history.md). A replayed graph queues the whole step in one launch.

    graphs = StepGraphs(params, enabled=True)
    loss = graphs(forward_backward, batch, scale)   # forward_backward(batch, scale), run or replayed

`forward_backward(batch, scale)` is the training loop's micro-batch step (train/loop.py's `train_step`): it
computes the loss, calls `(loss * scale).backward()` so gradients accumulate into `p.grad`, and returns the loss.
StepGraphs runs it as it is, or replays its capture: it adds nothing to the step. The function handed in must do
the same thing at every call (train_step builds it afresh each step, from the same parts): a replay runs what was
captured, not the function it is handed.

The first `capture_after` runs of a shape run eagerly (they compile, autotune and fill the offload's host
buffers); the next one is captured into a graph, which then replays for every batch of that shape. What a
replay needs stays in place for the graph's life: the batch is copied into static input tensors, the offload's
pinned host buffers stay in its pool (kernels/offload.py), and all graphs share one memory pool. Gradients: a
micro-batch that finds none (`zero_grad(set_to_none=True)` before it) replays a graph whose backward allocates
them in the pool as it goes, as eager does, so the peak memory is eager's; they become `p.grad` after the replay
and are overwritten by the next replay of that graph. A micro-batch that finds gradients (accumulation) replays
a second graph that adds into static buffers, loaded with what `p.grad` held.

Not captured (the step stays eager, and `reason` says why): a model that draws random numbers (dropout; the
recompute replays the RNG state, which cannot be read inside a capture), CPU, graphs past `max_graphs`.
A capture that fails turns graphs off for the run with a warning and runs the step eagerly. The eager path is
the reference: tests/kernels/test_graphs.py compares replays with it on the GPU, and the bookkeeping on the CPU
with a stand-in for the graph.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from tunery.kernels.options import StepState

log = logging.getLogger(__name__)

class _CudaGraph:
    """torch.cuda.CUDAGraph with the capture as a call: `capture(fn)` records fn, `replay()` runs it."""

    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


Step = Callable[[dict, "float | torch.Tensor"], torch.Tensor]  # forward_backward(batch, scale) -> loss


class StepGraphs:
    """Runs a micro-batch step `forward_backward(batch, scale)` eagerly, or as a CUDA graph per batch shape.

    `state`: the fast path's StepState (its `capturing` is set while a capture records). `packed`: the batches
    are packed rows (their position_ids restart per example). `capture_after`, `max_graphs`: FastPathOptions'."""

    def __init__(self, params: list[torch.nn.Parameter], enabled: bool = True, reason: str = "", graph_cls=None,
                 state: StepState | None = None, packed: bool = False, capture_after: int = 2, max_graphs: int = 4):
        self.params = [p for p in params if p.requires_grad]
        self.state, self.packed = state or StepState(), packed
        self.capture_after, self.max_graphs = capture_after, max_graphs
        self.reason = reason if not enabled else ""
        self.enabled = enabled
        self._graph_cls = graph_cls or _CudaGraph
        self._pool = None
        self._seen: dict[tuple, int] = {}
        # (shape key, fresh) -> (graph, static batch, static scale, static loss, gradients it leaves)
        self._graphs: dict[tuple, tuple] = {}
        self._sums: list[torch.Tensor] | None = None  # the gradient buffers accumulating graphs add into

    @property
    def captured(self) -> int:
        """CUDA graphs captured so far (a batch shape takes two when gradients accumulate)."""
        return len(self._graphs)

    def describe(self) -> str:
        if not self.enabled:
            return f"no CUDA graphs ({self.reason})"
        return (f"forward+backward captured as a CUDA graph per batch shape, from a shape's micro-batch "
                f"{self.capture_after + 1} on ({len(self._graphs)} captured so far)")

    def __call__(self, forward_backward: Step, batch: dict, scale: float) -> torch.Tensor:
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if not self.enabled:
            return forward_backward(tensors, scale)
        shape = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(tensors.items()))
        # a step's first micro-batch (no gradients yet) writes the gradients, a later one adds to them: two graphs
        key = (shape, all(p.grad is None for p in self.params))
        if key in self._graphs:
            return self._replay(key, tensors, scale)
        seen = self._seen[shape] = self._seen.get(shape, 0) + 1
        if seen <= self.capture_after or len(self._graphs) >= self.max_graphs:
            return forward_backward(tensors, scale)
        try:
            self._capture(forward_backward, key, tensors)
        except Exception as e:  # noqa: BLE001 - any failure leaves the eager step, which is always right
            self.enabled, self.reason = False, f"capture failed: {type(e).__name__}: {e}"
            log.warning("CUDA graphs off for this run (the steps run eagerly): %s", self.reason)
            self.state.reset()
            self._graphs.clear()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return forward_backward(tensors, scale)
        return self._replay(key, tensors, scale)

    def _capture(self, forward_backward: Step, key: tuple, tensors: dict) -> None:
        """Capture the step for `key`. Fresh (no gradients yet): backward allocates each gradient in the graphs'
        pool as it reaches it, as an eager step does, and those tensors become `p.grad` after each replay. Else it
        adds into static buffers that exist before it starts (as an eager step's earlier gradients do)."""
        _, fresh = key
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
        saved = [p.grad for p in self.params]
        if fresh:
            for p in self.params:
                p.grad = None
        else:
            if self._sums is None:  # outside the graphs' pool: they outlive every graph
                self._sums = [torch.zeros_like(p) for p in self.params]
            self._attach(self._sums)
        static = {k: v.clone() for k, v in tensors.items()}
        scale = torch.ones((), dtype=torch.float32, device=next(iter(tensors.values())).device)
        graph = self._graph_cls(self._pool)
        _free_cublas_workspaces()
        try:
            with capture_context(self.state, self.packed):
                loss = graph.capture(lambda: forward_backward(static, scale))
            grads = [p.grad for p in self.params]
            if not fresh and any(g is not s for g, s in zip(grads, self._sums)):
                raise RuntimeError("autograd replaced a gradient buffer instead of adding into it")
        finally:  # a capture computes nothing: the gradients are what they were
            for p, g in zip(self.params, saved):
                p.grad = g
        self._graphs[key] = (graph, static, scale, loss, grads)

    def _attach(self, buffers: list[torch.Tensor]) -> None:
        """Make each parameter's gradient its buffer, holding what `p.grad` held (zero for None)."""
        for p, g in zip(self.params, buffers):
            if p.grad is not g:
                if p.grad is None:
                    g.zero_()
                else:
                    g.copy_(p.grad)
                p.grad = g

    def _replay(self, key: tuple, tensors: dict, scale: float) -> torch.Tensor:
        graph, static, static_scale, loss, grads = self._graphs[key]
        for k, v in tensors.items():
            static[k].copy_(v)
        static_scale.fill_(scale)
        if not key[1]:
            self._attach(self._sums)
        graph.replay()
        if key[1]:  # what the replay wrote; the next replay of this graph overwrites it
            for p, g in zip(self.params, grads):
                p.grad = g
        return loss.clone()


@contextlib.contextmanager
def capture_context(state: StepState, packed: bool = False):
    """What a capture runs under. Dynamo may not recompile (a recompile inside a capture would compile and
    autotune there, which a capture does not allow): it raises instead, and the step stays eager.
    transformers takes a stream capture for tracing, and its mask code then decides as it does for a traced
    graph, where values cannot be read: its sdpa mask builder builds an explicit mask (slower attention, a
    recompile of the blocks) where an eager step gets none and sdpa runs causal, and position ids count as
    packed documents even when none restarts. Under the capture the sdpa builder returns none exactly where an
    eager step's would (`_eager_skip`) and builds the mask everywhere else (padding, packing, a sliding window
    the sequence reaches); and a batch that is not `packed` (no position_ids of its own: the model numbers its
    positions 0, 1, ...) is not read as packed. Other builders (eager attention's) are left as they are: for
    them no mask means no masking at all. `state.capturing` is on meanwhile."""
    from transformers import masking_utils
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks
    from transformers.masking_utils import sdpa_mask

    saved = dict(masks._local_mapping)
    current = {**masks._global_mapping, **saved}
    masks._local_mapping.update({name: _eager_skip(build) for name, build in current.items() if build is sdpa_mask})
    find_packed = getattr(masking_utils, "find_packed_sequence_indices", None)
    if find_packed is not None and not packed:
        masking_utils.find_packed_sequence_indices = _not_packed
    state.capturing = True
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            yield
    finally:
        state.capturing = False
        if find_packed is not None:
            masking_utils.find_packed_sequence_indices = find_packed
        masks._local_mapping.clear()
        masks._local_mapping.update(saved)


def _not_packed(position_ids: torch.Tensor) -> None:
    """transformers' packed-document finder for a batch without position ids of its own: none restarts."""
    return None


def _eager_skip(build: Callable) -> Callable:
    """sdpa's mask builder `build`, returning None (sdpa's own causal mask) where an eager call skips the mask: a
    skip allowed (no packing, no extra mask function), no padding mask, queries over all keys, and no local
    window the keys reach (transformers' `_ignore_causal_mask_sdpa`, without its tracing check)."""
    from tunery.kernels.attention import skipping_mask

    def skips(a: dict) -> bool:
        q, kv, local = a.get("q_length"), a.get("kv_length"), a.get("local_size")
        causal = a.get("allow_is_causal_skip") and a.get("attention_mask") is None and q == kv
        return bool(causal and (local is None or kv < local))

    return skipping_mask(build, skips)


def _free_cublas_workspaces() -> None:
    """Let go of cuBLAS's workspaces (32 MiB or so per stream on Hopper). The capture runs on its own stream and
    makes its own, so the eager steps' one would otherwise stay allocated beside it: about 60 MiB of peak memory
    over the eager step's, measured on Llama-3.1-8B (docs/benchmarks-history.md)."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        clear()


def graphs_reason(model, device: str, fast) -> str:
    """Why steps of `model` are not captured, or "" when they can be."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return "CPU"
    if fast is None or not fast.applied:
        return "the reference path"
    from tunery.kernels.offload import draws_random

    if draws_random(model):
        return "the model draws random numbers (dropout): set lora_dropout 0 to capture"
    return ""
