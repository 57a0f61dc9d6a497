"""Which fast paths a model gets: decided per family (data), applied explicitly, reported, switchable off.

    report = fast_path_for(model, device, enabled=cfg.fast)   # -> FastPath(...), with .describe()

For the families in `FAMILY_FAST_PATHS` (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, LFM2), whose output is an
`lm_head` over the final norm, soft-capped or not (Gemma 2):
- the fused linear + cross-entropy loss (kernels/linear_ce.py);
- fused LoRA linears with a hand-written backward, 16-bit or 4-bit base (kernels/lora.py); with a 16-bit base,
  the projections that share an input (q/k/v, gate/up) of a model up to 2048 wide as one matmul with the
  adapters inside it (kernels/lora_group.py);
- checkpointing that offloads block inputs to pinned CPU memory, when checkpointing is on (kernels/offload.py),
  whose recompute skips the MLP's down projection (its output is never read in backward) and, with
  `stash_attention`, the attention sublayer, kept from forward in pinned CPU memory instead;
- attention through sdpa with cuDNN's fused kernel first, on Hopper and newer GPUs, where it was measured
  faster (kernels/attention.py); with packing, a packed row's examples through varlen flash attention, each
  on its own, and no mask over the row (kernels/varlen.py);
- torch.compile of each decoder block's forward as one region, reused by all blocks; when checkpointing is
  on, inside the block's checkpoint hook, which stays outside the compiled code (kernels/ops.py); the liger
  RMSNorm/SwiGLU swaps are the `ops=True` option.
The training step around them may run as a captured CUDA graph (kernels/graphs.py, `train.loop.step_graphs`).
Used on CUDA in single-process training; CPU training keeps the reference path, which is what CI checks
the fast path against (tests/kernels compare each piece with its reference on random inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

# model_type -> fast paths that are exact for it. The liger swaps ("ops") compute Llama's RMSNorm and SwiGLU:
# Gemma's norms scale by 1 + weight and its MLP is GeGLU; LFM2's modules have other names (nothing to swap).
_ALL = ("fused_linear_ce", "fused_lora", "offload", "attention", "ops", "compile")
_NO_OPS = tuple(p for p in _ALL if p != "ops")
FAMILY_FAST_PATHS: dict[str, tuple[str, ...]] = {
    **{t: _ALL for t in ("llama", "mistral", "qwen2", "qwen3", "phi3")},
    **{t: _NO_OPS for t in ("gemma", "gemma2", "gemma3_text", "lfm2")}}
# model_type -> layers whose output only feeds the block's last residual add (no norm after the MLP), so a
# recompute for backward need not compute it (kernels/lora.py). Not Gemma 2/3: a norm reads the MLP's output.
UNREAD_IN_RECOMPUTE: dict[str, tuple[str, ...]] = {
    **{t: ("mlp.down_proj",) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")},
    "lfm2": ("feed_forward.w2",)}
# model_type -> (parent module suffix, its projections that read one input, in the order the parent calls them,
# those whose output backward keeps as it is): grouped into one matmul with their adapters (kernels/lora_group.py).
# v goes into attention unchanged and is saved there; as a view of the group's output it would keep all of q/k/v.
# Phi-3's checkpoints already hold q/k/v and gate/up as one linear each (qkv_proj, gate_up_proj).
_QKV = ("self_attn", ("q_proj", "k_proj", "v_proj"), ("v_proj",))
LORA_GROUPS: dict[str, tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = {
    **{t: (_QKV, ("mlp", ("gate_proj", "up_proj"), ()))
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "lfm2": (_QKV, ("feed_forward", ("w1", "w3"), ()))}


@dataclass
class FastPath:
    decoder: object = None  # the transformer body that returns hidden states
    lm_head: object = None
    applied: list[str] = field(default_factory=list)
    reason: str = ""
    undo: list = field(default_factory=list)
    compiled: bool = False  # blocks run under torch.compile: batches padded to a few lengths recompile less
    softcap: float | None = None  # the model's final logit soft-capping (Gemma 2), applied by the fused loss

    def remove(self) -> None:
        """Put the replaced modules back (the fused loss needs nothing undone: it is chosen per call)."""
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()
        self.applied = [a for a in self.applied if a.startswith("fused linear")]
        self.compiled = False

    def describe(self) -> str:
        return ("fast path: " + ", ".join(self.applied)) if self.applied else f"reference path ({self.reason})"


def _hopper_or_newer(device: str) -> bool:
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return cuda and torch.cuda.get_device_capability(device) >= (9, 0)


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fast_path_for(model, device: str, enabled: bool = True, distributed: bool = False,
                  allow_cpu: bool = False, ops: bool = False, compile: bool = True, lora: bool = True,
                  lora_groups: bool = True, offload: bool = True, stash_attention: bool = True,
                  compile_backend: str | Callable = "inductor", packing: bool = False,
                  varlen_attention: bool = True) -> FastPath:
    """The fast paths `model` gets here, with the reason when it gets none. `compile_backend` is torch.compile's
    backend (the tests compile on CPU with "aot_eager"). `packing`: batches are packed rows, whose attention
    then runs as varlen attention where it can (`varlen_attention`; kernels/varlen.py)."""
    if not enabled:
        return FastPath(reason="switched off (--no-fast)")
    if not device.startswith("cuda") and not allow_cpu:
        return FastPath(reason="CPU: the reference path is the tested one")
    if distributed:
        return FastPath(reason="multi-process training uses the DDP-wrapped forward")
    base = _unwrap(model)
    paths = FAMILY_FAST_PATHS.get(getattr(base.config, "model_type", ""), ())
    if "fused_linear_ce" not in paths:
        return FastPath(reason=f"no fast path for model type {base.config.model_type!r} yet")
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    lm_head = base.get_output_embeddings()
    if decoder is None or lm_head is None or getattr(lm_head, "bias", None) is not None:
        return FastPath(reason="model has no plain decoder + lm_head")
    softcap = getattr(base.config, "final_logit_softcapping", None)
    fast = FastPath(decoder=decoder, lm_head=lm_head, softcap=softcap,
                    applied=["fused linear+cross-entropy (chunked; no full-vocabulary logits"
                             + (f"; logits soft-capped at {softcap:g})" if softcap else ")")])
    from tunery.kernels import ops as kops

    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in getattr(decoder, "layers", ()))
    steps = []  # each returns (what it did, undo callables)
    offloaded = offload and checkpointed and "offload" in paths
    if lora and "fused_lora" in paths:
        from tunery.kernels.lora import fuse_lora

        unread = UNREAD_IN_RECOMPUTE.get(base.config.model_type, ()) if offloaded else ()
        steps.append(partial(fuse_lora, model, unread))
        groups = LORA_GROUPS.get(base.config.model_type, ())
        if lora_groups and groups:
            from tunery.kernels.lora_group import group_lora

            steps.append(partial(group_lora, model, groups, decoder))
    if offloaded:
        from tunery.kernels.offload import enable_offload

        steps.append(partial(enable_offload, model, stash_attention))
    from tunery.kernels.varlen import use_varlen_attention, varlen_problem

    if packing and "attention" in paths and varlen_attention and not varlen_problem(model):
        steps.append(partial(use_varlen_attention, model, cudnn=_hopper_or_newer(device)))
    elif "attention" in paths and _hopper_or_newer(device):
        from tunery.kernels.attention import use_cudnn_attention

        steps.append(partial(use_cudnn_attention, model))
    if ops and "ops" in paths and kops.liger_available():
        steps.append(partial(kops.swap_ops, decoder))
    if compile and "compile" in paths:
        steps.append(partial(kops.compile_blocks, decoder, backend=compile_backend))
    for step in steps:
        done, undo = step()
        fast.applied += done
        fast.undo += undo
        fast.compiled |= step.func is kops.compile_blocks and bool(done)
    return fast
