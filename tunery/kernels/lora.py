"""LoRA linear layers as one autograd op: base and adapter matmuls together, with a hand-written backward.

    y = x W^T (+ bias) + s (x A^T) B^T           x (N, in), W (out, in), A (r, in), B (out, r)

PEFT computes this as separate modules, casts `x` to the adapter's fp32 dtype, and lets autograd save
what each piece needs. The fused op runs every matmul in the compute dtype (bf16) with the adapter added
in place (`addmm_`), keeps only `x` and the small `x A^T` for backward, and computes there exactly what a
frozen base needs:

    dx = dy W + (s dy B) A        dA = (s dy B)^T x        dB = s dy^T (x A^T)

The base weight may be a bitsandbytes 4-bit (NF4) tensor: it is dequantized into a buffer reused by every
layer of the same shape, in forward and again in backward, so at most one dense copy per shape exists.

`fuse_lora(model)` rebinds the forward of each PEFT LoRA `Linear` it can handle on that instance, reading
the PEFT weights (so adapters still save in PEFT format). LoRA dropout is applied to the adapter's input
outside the op (autograd differentiates it), so the base matmul still sees the undropped `x`. Anything
else (DoRA and other variants, several active adapters, a disabled or merged adapter) keeps PEFT's forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          b: torch.Tensor, scale: float) -> torch.Tensor:
    """What PEFT's LoRA Linear computes (dropout 0), in plain PyTorch."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype)


_DEQUANT_BUFFERS: dict[tuple, torch.Tensor] = {}


def _dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense (out, in) tensor: itself, or a 4-bit weight dequantized into a reused buffer."""
    if getattr(weight, "quant_state", None) is None:
        return weight
    return _dequantize(weight, dtype)


@torch.compiler.disable  # bitsandbytes' tensor subclass and ops stay outside compiled graphs
def _dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    if weight.device.type != "cuda":  # bitsandbytes' CPU backend has no in-place (out=) dequantization
        return bnbf.dequantize_4bit(weight, state).to(dtype)
    key = (tuple(state.shape), state.dtype, weight.device)
    buf = _DEQUANT_BUFFERS.get(key)
    if buf is None:
        buf = _DEQUANT_BUFFERS[key] = torch.empty(state.shape, dtype=state.dtype, device=weight.device)
    return bnbf.dequantize_4bit(weight, state, out=buf).to(dtype)


class _LoRALinear(torch.autograd.Function):
    """`x_lora` is the adapter's input: `x` itself (None), or `dropout(x)` computed by autograd outside."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, a, b, scale):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        xl = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
        a_c, b_c = a.to(x.dtype), b.to(x.dtype)
        xa = xl @ a_c.t()  # (N, r)
        w = _dense_weight(weight, x.dtype)
        out = torch.addmm(bias.to(x.dtype), x2, w.t()) if bias is not None else x2 @ w.t()
        out.addmm_(xa, b_c.t(), alpha=scale)
        ctx.save_for_backward(x if x_lora is None else x_lora, xa, weight, a, b)
        ctx.scale, ctx.shared = scale, x_lora is None
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xl, xa, weight, a, b = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        xl2 = xl.reshape(-1, xl.shape[-1])
        a_c, b_c = a.to(g.dtype), b.to(g.dtype)
        gb = (g @ b_c).mul_(s)  # (N, r) = s dy B
        dx = dxl = da = db = None
        if ctx.needs_input_grad[0]:
            dx = g @ _dense_weight(weight, g.dtype)
            if ctx.shared:
                dx.addmm_(gb, a_c)
            dx = dx.view(xl.shape)
        if ctx.needs_input_grad[1]:
            dxl = (gb @ a_c).view(xl.shape)
        if ctx.needs_input_grad[4]:
            da = (gb.t() @ xl2).to(a.dtype)
        if ctx.needs_input_grad[5]:
            db = (g.t() @ xa).mul_(s).to(b.dtype)
        return dx, dxl, None, None, da, db, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                scale: float, impl: str = "fused") -> torch.Tensor:
    """`x W^T + bias + s (x A^T) B^T` with W frozen; impl "fused" or "reference"."""
    if impl == "reference":
        return lora_linear_reference(x, _dense_weight(weight, x.dtype), bias, a, b, scale)
    return _LoRALinear.apply(x, None, weight, bias, a, b, scale)


def _fusable(module) -> str | None:
    """Why a PEFT LoRA Linear cannot take the fused forward, or None when it can."""
    base = module.get_base_layer()
    if type(base) is not nn.Linear and type(base).__name__ != "Linear4bit":
        return f"base layer is {type(base).__name__}"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    for name in module.active_adapters:
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name):
            return "a LoRA variant (DoRA, ...)"
        if not isinstance(module.lora_dropout[name], (nn.Identity, nn.Dropout)):
            return f"lora_dropout is {type(module.lora_dropout[name]).__name__}"
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = self.active_adapters
    if self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own path
    name = active[0]
    base = self.get_base_layer()
    if getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False):
        # bitsandbytes repacked this 4-bit weight for its CPU inference kernel: only its own matmul reads it
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    x_lora = dropout(x) if isinstance(dropout, nn.Dropout) and dropout.p > 0 and self.training else None
    return _LoRALinear.apply(x, x_lora, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                             self.scaling[name])


def fuse_lora(model: nn.Module) -> tuple[list[str], list]:
    """Rebind each fusable PEFT LoRA Linear's forward to the fused op; returns (what was done, undo callables)."""
    from peft.tuners.lora import LoraLayer

    fused, skipped, undo = 0, {}, []
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        why = _fusable(module)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        module.forward = types.MethodType(_fused_forward, module)
        undo.append(lambda m=module: delattr(m, "forward"))
        fused += 1
    done = [f"fused LoRA x{fused} (base + adapter in one op, hand-written backward)"] if fused else []
    done += [f"PEFT LoRA kept x{n} ({why})" for why, n in skipped.items()]
    return done, undo
