"""Which fast paths a model gets: decided per family (data), applied explicitly, reported, switchable off.

    fast = fast_path_for(model, device, family, cfg.fast_path)   # -> FastPath(...), with .describe()

`family` is the model's record in models/catalog.py (this package imports nothing outside kernels/: the training
loop looks the family up and passes it in); its `pieces` say which of these are exact for it. For families whose
output is an `lm_head` over the final norm, soft-capped or not (Gemma 2):
- the fused linear + cross-entropy loss (kernels/linear_ce.py);
- fused LoRA linears with a hand-written backward, 16-bit or 4-bit base (kernels/lora.py); with a 16-bit base,
  the projections that share an input (the family's `lora_groups`: q/k/v, gate/up) of a model up to
  `group_max_width` wide as one matmul with the adapters inside it (kernels/lora_group.py);
- checkpointing that offloads block inputs to pinned CPU memory, when checkpointing is on (kernels/offload.py),
  whose recompute skips the layers the family marks `unread_in_recompute` (the MLP's down projection: its
  output is never read in backward) and, with `stash_attention`, the attention sublayer, kept from forward in
  pinned CPU memory instead;
- attention through sdpa with cuDNN's fused kernel first, on Hopper and newer GPUs, where it was measured
  faster (kernels/attention.py); with packing, a packed row's examples through varlen flash attention, each
  on its own, and no mask over the row (kernels/varlen.py);
- torch.compile of each decoder block's forward as one region, reused by all blocks (kernels/ops.py); the liger
  RMSNorm/SwiGLU swaps are the `liger_ops` option.

The order matters and is fixed here: LoRA fusion first (grouping rebinds the fused layers), then grouping, then
the offload hook (it wraps transformers' checkpoint function), then attention, then torch.compile, which
compiles each block inside the offload hook, so the hook stays outside the compiled code. The pieces share one
`StepState` (kernels/options.py), created here and kept on the FastPath. The training step around them may run
as a captured CUDA graph (kernels/graphs.py). Used on CUDA in single-process training; CPU training keeps the
reference path, which is what CI checks the fast path against (tests/kernels compare each piece with its
reference on random inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from tunery.kernels.options import FastPathOptions, StepState


class FamilyFacts(Protocol):
    """What the fast path reads of a model family (models/catalog.Family)."""

    pieces: tuple[str, ...]  # of "fused_linear_ce", "fused_lora", "offload", "attention", "ops", "compile"
    lora_groups: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]

    def unread_in_recompute(self, model_type: str) -> tuple[str, ...]: ...


@dataclass
class FastPath:
    decoder: object = None  # the transformer body that returns hidden states
    lm_head: object = None
    applied: list[str] = field(default_factory=list)
    reason: str = ""
    undo: list = field(default_factory=list)
    compiled: bool = False  # blocks run under torch.compile: batches padded to a few lengths recompile less
    softcap: float | None = None  # the model's final logit soft-capping (Gemma 2), applied by the fused loss
    options: FastPathOptions = field(default_factory=FastPathOptions)
    notes: list[str] = field(default_factory=list)  # choices made for this run (train/loop.py's choose_compile)
    state: StepState = field(default_factory=StepState)  # shared by the pieces while a step runs

    def remove(self) -> None:
        """Put the replaced modules back (the fused loss needs nothing undone: it is chosen per call)."""
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()
        self.applied = [a for a in self.applied if a.startswith("fused linear")]
        self.compiled = False

    def describe(self) -> str:
        text = ("fast path: " + ", ".join(self.applied)) if self.applied else f"reference path ({self.reason})"
        return "; ".join([text, *self.notes]) if self.applied else text


def _hopper_or_newer(device: str) -> bool:
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return cuda and torch.cuda.get_device_capability(device) >= (9, 0)


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fast_path_for(model, device: str, family: FamilyFacts | None, options: FastPathOptions | None = None, *,
                  enabled: bool = True, distributed: bool = False, packing: bool = False,
                  checkpointing: bool = False) -> FastPath:
    """The fast paths `model` gets here, with the reason when it gets none. `family`: the model's family record
    (None: an architecture without a fast path). `enabled`: False is --no-fast. `packing`: batches are packed
    rows, whose attention then runs as varlen attention where it can. `checkpointing`: the run checkpoints its
    blocks (then their inputs go to CPU memory: `offload`)."""
    opts = options or FastPathOptions()
    if not enabled:
        return FastPath(reason="switched off (--no-fast)", options=opts)
    if not device.startswith("cuda") and not opts.allow_cpu:
        return FastPath(reason="CPU: the reference path is the tested one", options=opts)
    if distributed:
        return FastPath(reason="multi-process training uses the DDP-wrapped forward", options=opts)
    base = _unwrap(model)
    model_type = getattr(base.config, "model_type", "")
    pieces = family.pieces if family is not None else ()
    if "fused_linear_ce" not in pieces:
        return FastPath(reason=f"no fast path for model type {model_type!r} yet", options=opts)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    lm_head = base.get_output_embeddings()
    if decoder is None or lm_head is None or getattr(lm_head, "bias", None) is not None:
        return FastPath(reason="model has no plain decoder + lm_head", options=opts)
    if "TrainableTokensWrapper" in (type(lm_head).__name__, type(base.get_input_embeddings()).__name__):
        # the fused loss reads lm_head.weight, which would miss the trained rows of the added tokens
        return FastPath(reason="the run trains added tokens' embedding rows (PEFT trainable tokens), which the "
                        "fused loss does not read", options=opts)
    softcap = getattr(base.config, "final_logit_softcapping", None)
    fast = FastPath(decoder=decoder, lm_head=lm_head, softcap=softcap, options=opts,
                    applied=["fused linear+cross-entropy (chunked; no full-vocabulary logits"
                             + (f"; logits soft-capped at {softcap:g})" if softcap else ")")])
    for step in _steps(model, device, family, model_type, decoder, fast, packing, checkpointing):
        done, undo = step()
        fast.applied += done
        fast.undo += undo
        fast.compiled |= step.func.__name__ == "compile_blocks" and bool(done)
    return fast


def _steps(model, device: str, family: FamilyFacts, model_type: str, decoder, fast: FastPath, packing: bool,
           checkpointing: bool) -> list[partial]:
    """The pieces to apply, in the order they must go on (see the module doc); each returns (done, undo)."""
    from tunery.kernels import ops as kops
    from tunery.kernels.varlen import use_varlen_attention, varlen_problem

    opts, state, pieces = fast.options, fast.state, family.pieces
    steps = []
    offloaded = opts.offload and checkpointing and "offload" in pieces
    if opts.fused_lora and "fused_lora" in pieces:
        from tunery.kernels.lora import fuse_lora

        unread = family.unread_in_recompute(model_type) if offloaded else ()
        steps.append(partial(fuse_lora, model, unread, state))
        if opts.lora_groups and family.lora_groups:
            from tunery.kernels.lora_group import group_lora

            steps.append(partial(group_lora, model, family.lora_groups, decoder, opts, state))
    if offloaded:
        from tunery.kernels.offload import enable_offload

        steps.append(partial(enable_offload, model, opts, state))
    if packing and "attention" in pieces and opts.varlen_attention and not varlen_problem(model):
        steps.append(partial(use_varlen_attention, model, cudnn=opts.cudnn_attention and _hopper_or_newer(device)))
    elif "attention" in pieces and opts.cudnn_attention and _hopper_or_newer(device):
        from tunery.kernels.attention import use_cudnn_attention

        steps.append(partial(use_cudnn_attention, model))
    if opts.liger_ops and "ops" in pieces and kops.liger_available():
        steps.append(partial(kops.swap_ops, decoder))
    if opts.compile is not False and "compile" in pieces:  # unset: on (the training loop decides it per run)
        steps.append(partial(kops.compile_blocks, decoder, backend=opts.compile_backend))
    return steps
