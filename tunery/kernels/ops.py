"""Fused norm and SwiGLU for decoder blocks (liger-kernel's Triton ops), swapped into a model instance.

Each swap is explicit and undoable: RMSNorm modules are replaced by a module that holds the same weight
Parameter (state_dict keys do not change); MLP forwards are rebound on the instance, so PEFT's LoRA
layers inside them keep working. The plain PyTorch references are the modules being replaced (HF's
RMSNorm and MLP); tests/kernels compares the two on random inputs on the GPU.

`compile_blocks` torch.compiles each block's forward as one region, inside the block's checkpoint hook when
checkpointing is on; tests/kernels compares its loss and gradients with PEFT's without compile or checkpointing.
"""

from __future__ import annotations

import functools
import importlib.util
import types
from collections.abc import Callable

import torch
from torch import nn

from tunery.kernels import offload
from tunery.kernels.dynamic import length_of, mark_length

NORM_SUFFIXES = ("input_layernorm", "post_attention_layernorm")  # per-block norms over the hidden size


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


class LigerRMSNorm(nn.Module):
    """RMSNorm through liger's kernel, computed like HF's Llama/Qwen RMSNorm (fp32 statistics)."""

    def __init__(self, weight: nn.Parameter, eps: float, original: nn.Module):
        super().__init__()
        self.weight, self.eps = weight, eps
        self._original = [original]  # kept out of the module tree so undo can put it back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops import LigerRMSNormFunction

        return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "llama", False)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops import LigerSiLUMulFunction

    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def swap_ops(decoder: nn.Module) -> tuple[list[str], list]:
    """Swap the blocks' RMSNorms and SwiGLU MLPs; returns (what was swapped, undo callables)."""
    undo, norms, mlps = [], 0, 0
    for name, module in list(decoder.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            is_norm = type(child).__name__.endswith("RMSNorm") and (full.endswith(NORM_SUFFIXES) or full == "norm")
            if is_norm:
                eps = getattr(child, "variance_epsilon", getattr(child, "eps", 1e-6))
                setattr(module, child_name, LigerRMSNorm(child.weight, eps, child))
                undo.append(lambda m=module, n=child_name, c=child: setattr(m, n, c))
                norms += 1
        if (all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
                and getattr(getattr(module, "config", None), "hidden_act", "silu") in ("silu", "swish")):
            module.forward = types.MethodType(_swiglu_forward, module)
            undo.append(lambda m=module: delattr(m, "forward"))
            mlps += 1
    done = []
    if norms:
        done.append(f"RMSNorm x{norms} (liger)")
    if mlps:
        done.append(f"SwiGLU MLP x{mlps} (liger)")
    return done, undo


def _run_block(run, *inputs):
    """A decoder block's forward: `run` is transformers' partial of it (call arguments bound), `inputs` what
    the checkpoint hook passes on (the hidden states first)."""
    return run(*inputs)


def _marked(compiled, run, *inputs):
    """`compiled(run, *inputs)` with the sequence length marked dynamic first (`mark_length`)."""
    n = length_of(inputs[0]) if inputs else None
    if n is not None:
        mark_length((run, inputs), n)
    return compiled(run, *inputs)


def _marked_attention(compiled, forward, hidden, *args, **kwargs):
    n = length_of(hidden)
    if n is not None:
        mark_length((hidden, args, kwargs), n)
    return compiled(forward, hidden, *args, **kwargs)


def _through(compiled, hook, run, *inputs):
    """A checkpoint hook (torch's checkpoint or the offloaded one) that runs, and recomputes, the block's
    forward through `compiled` instead of eagerly; the hook itself stays outside the compiled code."""
    return hook(functools.partial(_marked, compiled, run), *inputs)


def compile_blocks(decoder: nn.Module, backend: str | Callable = "inductor") -> tuple[list[str], list]:
    """torch.compile each decoder block's forward as one region; returns (what was done, undo callables).

    A block without checkpointing is compiled as a module. A checkpointed block is not: compiling the module
    would pull its checkpoint hook (host copies, CUDA streams, an autograd.Function) into the compiled code.
    Its hook is wrapped instead, so the forward the hook runs and recomputes (norms, attention, MLP and the
    residual adds) goes through one compiled function shared by all blocks. transformers hands the hook a
    partial of the layer's `forward` (as in 5.23) or of `nn.Module.__call__` (older releases); both are just called.
    The blocks run the same code on same-shaped inputs, so dynamo compiles that function once per mode, not
    once per block: twice for the offloaded (or reentrant) checkpoint, whose forward runs without grad and
    whose recompute with grad, once for torch's non-reentrant one (both with grad). In eval mode transformers
    calls no hook, so checkpointed blocks evaluate uncompiled."""
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return [], []
    compiled = torch.compile(_run_block, backend=backend)
    attention = torch.compile(offload.run_attention, backend=backend)
    undo, hooked = [], 0
    for layer in layers:
        kept = getattr(layer, "self_attn", None)
        if hasattr(kept, "_tunery_attention_run"):  # a stashing sublayer breaks the block's graph: compile its run
            kept._tunery_attention_run = functools.partial(_marked_attention, attention)
            undo.append(lambda m=kept: setattr(m, "_tunery_attention_run", offload.run_attention))
        hook = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(layer, "gradient_checkpointing", False) and hook is not None:
            layer._gradient_checkpointing_func = functools.partial(_through, compiled, hook)
            undo.append(lambda m=layer, f=hook: setattr(m, "_gradient_checkpointing_func", f))
            hooked += 1
        else:
            layer.compile(backend=backend)
            undo.append(lambda m=layer: setattr(m, "_compiled_call_impl", None))
    outside = f" (its checkpoint hook outside it: x{hooked})" if hooked else ""
    return [f"torch.compile of each block's whole forward as one region x{len(layers)}{outside}"], undo
