"""Fused norm and SwiGLU for decoder blocks (liger-kernel's Triton ops), swapped into a model instance.

Each swap is explicit and undoable: RMSNorm modules are replaced by a module that holds the same weight
Parameter (state_dict keys do not change); MLP forwards are rebound on the instance, so PEFT's LoRA
layers inside them keep working. The plain PyTorch references are the modules being replaced (HF's
RMSNorm and MLP); tests/kernels compares the two on random inputs on the GPU.
"""

from __future__ import annotations

import importlib.util
import types

import torch
from torch import nn

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


BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def compile_blocks(decoder: nn.Module, parts: bool = False) -> tuple[list[str], list]:
    """torch.compile each decoder block (identical code: compiled once, reused), or with `parts` each block's
    norms, attention and MLP, which leaves the block's checkpoint hook (and its offloading) uncompiled."""
    layers = getattr(decoder, "layers", None)
    if layers is None:
        return [], []
    targets = ([getattr(layer, p) for layer in layers for p in BLOCK_PARTS if hasattr(layer, p)] if parts
               else list(layers))
    for module in targets:
        module.compile()
    what = "norms, attention and MLP of " if parts else ""
    return [f"torch.compile {what}x{len(layers)} blocks"], [
        lambda: [setattr(m, "_compiled_call_impl", None) for m in targets]]
