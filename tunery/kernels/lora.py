"""LoRA linear layers as one autograd op: base and adapter matmuls together, with a hand-written backward.

    y = x W^T (+ bias) + s (x A^T) B^T           x (N, in), W (out, in), A (r, in), B (out, r)

PEFT computes this as separate modules, casts `x` to the adapter's fp32 dtype, and lets autograd save
what each piece needs. The fused op runs every matmul in the compute dtype (bf16), both matmuls of an
output into one buffer (the rank-r product writes it, the base matmul adds into it), keeps only `x`
and the small `x A^T` for backward, and computes there exactly what a frozen base needs:

    dx = dy W + (s dy B) A        dA = (s dy B)^T x        dB = s dy^T (x A^T)

The base weight may be a bitsandbytes 4-bit (NF4) tensor. It enters the op as plain tensors (`NF4`: the
packed bytes and the block scales) and is dequantized in one Triton launch on CUDA (kernels/nf4.py), else
through bitsandbytes' registered torch ops, so the op stays inside compiled graphs (bitsandbytes' Python-side
tensor subclass would split them). Each matmul that
reads it dequantizes it into a temporary and lets it go (`tunery::lora_out_nf4`, `tunery::lora_dx_nf4` under
compile): forward and backward each dequantize, and no dense copy outlives its matmul. With the dense weight as
a value of the compiled graph instead, inductor's partitioner kept it from a block's recompute to its backward
or, once told to recompute it, held each one from the MLP's deferred forward matmul to its dx in backward:
Llama-3.1-8B's QLoRA step peaked at 7.28 and 7.20 GiB, against 6.98 now (docs/benchmarks-history.md).

The output of a projection that only feeds the block's last residual add (the MLP's down projection in
Llama-like blocks) is never read in backward. When the offloaded checkpoint recomputes a block to build its
graph (kernels/offload.py), such a layer skips its base matmul and returns an uninitialised tensor: the
backward needs only its saved input.

Under torch.compile the two matmuls that share an output (adapter and base in forward, the adapter's term of
dx and `dy W` in backward) run as one opaque op each (`tunery::lora_out`, `tunery::lora_dx`).
Traced as plain aten calls, the in-place `addmm_` is functionalized into an out-of-place addmm, which first
copies the whole (N, out) base output into a new buffer: one device-to-device copy per LoRA layer and pass,
about 7% of a Llama-3.2-1B or Qwen2.5-0.5B step on the H100. The ops' bodies are the eager code.

`fuse_lora(model)` rebinds the forward of each PEFT LoRA `Linear` it can handle on that instance, reading
the PEFT weights (so adapters still save in PEFT format). LoRA dropout is applied to the adapter's input
outside the op (autograd differentiates it), so the base matmul still sees the undropped `x`. Anything
else (DoRA and other variants, several active adapters, a disabled or merged adapter) keeps PEFT's forward.
Projections that read one input (q/k/v, gate/up) may instead run as one matmul with their adapters inside it
(kernels/lora_group.py), which falls back to this op for any call it cannot serve.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tunery.kernels.nf4 import dequantize as _dequantize_4bit
from tunery.kernels.options import StepState


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          b: torch.Tensor, scale: float) -> torch.Tensor:
    """What PEFT's LoRA Linear computes (dropout 0), in plain PyTorch."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype)


class NF4(NamedTuple):
    """A bitsandbytes 4-bit weight as plain tensors and constants: what its dequantization ops read."""

    packed: torch.Tensor  # uint8, two 4-bit codes a byte
    absmax: torch.Tensor  # per-block scales: fp32, or uint8 when themselves quantized (nested)
    absmax2: torch.Tensor | None  # nested: the scales' own fp32 scales
    code2: torch.Tensor | None  # nested: the 8-bit code book of the scales
    offset: torch.Tensor | None  # nested: added back to the dequantized scales (a tensor: no float guard)
    meta: tuple  # (blocksize, nested blocksize, quant type, shape, dtype)


def nf4_of(weight) -> NF4 | None:
    """`weight` as NF4 tensors, or None when it is not a bitsandbytes 4-bit weight in the standard layout."""
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return None  # a dense weight, or one bitsandbytes repacked for its CPU inference kernel
    packed = weight.detach()  # a plain tensor on the same storage (Params4bit's torch function unwraps)
    nested = state.nested
    offset = torch.as_tensor(state.offset, dtype=torch.float32, device=state.absmax.device) if nested else None
    return NF4(packed, state.absmax, state.state2.absmax if nested else None, state.state2.code if nested else None,
               offset,
               (state.blocksize, state.state2.blocksize if nested else 0, state.quant_type, tuple(state.shape),
                state.dtype))


def _nf4_args(q: NF4) -> tuple:
    """The NF4 weight as the opaque ops' arguments: tensors, then its layout as ints, a string and a dtype."""
    blocksize, blocksize2, quant_type, shape, qdtype = q.meta
    return q.packed, q.absmax, q.absmax2, q.code2, q.offset, [blocksize, blocksize2, *shape], quant_type, qdtype


def _nf4_dense(packed, absmax, absmax2, code2, offset, layout, quant_type, qdtype, dtype) -> torch.Tensor:
    return _dequantize_4bit(packed, absmax, absmax2, code2, offset, layout, quant_type, qdtype).to(dtype)


def dequantize_nf4(q: NF4, dtype: torch.dtype) -> torch.Tensor:
    """The dense (out, in) weight: kernels/nf4.py on CUDA, else bitsandbytes' registered ops."""
    return _nf4_dense(*_nf4_args(q), dtype)


# Both matmuls write one output buffer: the rank-r product writes it and the base matmul adds into it (beta=1:
# read in its epilogue while it computes). The other order (base first, then a memory-bound pass that reads and
# writes the whole output again to add the adapter) was 1.3% slower on Llama-3.2-1B and 0.5% on Qwen2.5-7B on an
# H100 (docs/benchmarks-history.md).
def _out(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, xa: torch.Tensor, b: torch.Tensor,
         scale: float) -> torch.Tensor:
    """x2 W^T (+ bias) + scale (x A^T) B^T, both matmuls into one output buffer (adapter first)."""
    if bias is not None:
        return torch.addmm(bias, xa, b.t(), alpha=scale).addmm_(x2, w.t())
    return (xa @ b.t()).addmm_(x2, w.t(), beta=scale)


def _dx(g: torch.Tensor, w: torch.Tensor, gb: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """dy W + (s dy B) A, both matmuls into one output buffer (adapter first)."""
    return (gb @ a).addmm_(g, w)


# Registered through the low-level library API rather than `torch.library.custom_op`: the latter adds a Python
# autograd kernel to every call. Profiled, each call cost 50 µs of host time with it and 22 µs without, and a
# Qwen2.5-0.5B step makes 480 of them; that step had waited on the host (docs/benchmarks-history.md).
# These ops run only inside compiled graphs, where autograd is already handled: the dispatcher's C++ fallback
# is enough.
_LIB = torch.library.Library("tunery", "FRAGMENT")
_LIB.define("lora_out(Tensor x2, Tensor w, Tensor? bias, Tensor xa, Tensor b, float scale) -> Tensor")
_LIB.define("lora_dx(Tensor g, Tensor w, Tensor gb, Tensor a) -> Tensor")
_LIB.impl("lora_out", _out, "CompositeExplicitAutograd")
_LIB.impl("lora_dx", _dx, "CompositeExplicitAutograd")
torch.library.register_fake("tunery::lora_out", lambda x2, w, bias, xa, b, scale: x2.new_empty(x2.shape[0], w.shape[0]),
                            lib=_LIB)
torch.library.register_fake("tunery::lora_dx", lambda g, w, gb, a: g.new_empty(g.shape[0], w.shape[1]), lib=_LIB)
_out_op, _dx_op = torch.ops.tunery.lora_out.default, torch.ops.tunery.lora_dx.default


def _out_nf4(x2, packed, absmax, absmax2, code2, offset, layout, quant_type, qdtype, bias, xa, b, scale):
    """`_out` with the base weight dequantized into a temporary (see the module doc)."""
    w = _nf4_dense(packed, absmax, absmax2, code2, offset, layout, quant_type, qdtype, x2.dtype)
    return _out(x2, w, bias, xa, b, scale)


def _dx_nf4(g, packed, absmax, absmax2, code2, offset, layout, quant_type, qdtype, gb, a):
    """`_dx` (or `dy W` alone when `gb` is None) with the base weight dequantized into a temporary."""
    w = _nf4_dense(packed, absmax, absmax2, code2, offset, layout, quant_type, qdtype, g.dtype)
    return _dx(g, w, gb, a) if gb is not None else g @ w


_NF4 = "Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, Tensor? offset, int[] layout, str quant_type, " \
       "ScalarType qdtype"
_LIB.define(f"lora_out_nf4(Tensor x2, {_NF4}, Tensor? bias, Tensor xa, Tensor b, float scale) -> Tensor")
_LIB.define(f"lora_dx_nf4(Tensor g, {_NF4}, Tensor? gb, Tensor? a) -> Tensor")
_LIB.impl("lora_out_nf4", _out_nf4, "CompositeExplicitAutograd")
_LIB.impl("lora_dx_nf4", _dx_nf4, "CompositeExplicitAutograd")
torch.library.register_fake("tunery::lora_out_nf4", lambda x2, *args: x2.new_empty(x2.shape[0], args[5][2]), lib=_LIB)
torch.library.register_fake("tunery::lora_dx_nf4", lambda g, *args: g.new_empty(g.shape[0], args[5][3]), lib=_LIB)
_out_nf4_op, _dx_nf4_op = torch.ops.tunery.lora_out_nf4.default, torch.ops.tunery.lora_dx_nf4.default


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _dense(weight: torch.Tensor, nf4: NF4 | None, dtype: torch.dtype) -> torch.Tensor:
    return weight if nf4 is None else dequantize_nf4(nf4, dtype)


class _LoRALinear(torch.autograd.Function):
    """`x_lora` is the adapter's input: `x` itself (None), or `dropout(x)` computed by autograd outside.
    `weight` is the dense base weight, or unused (None) when `nf4` holds it; `skip_base`: see the module doc."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, nf4, bias, a, b, scale, skip_base):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        xl = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
        a_c, b_c = a.to(x.dtype), b.to(x.dtype)
        xa = xl @ a_c.t()  # (N, r)
        ctx.save_for_backward(x if x_lora is None else x_lora, xa, weight, a, b)
        ctx.nf4, ctx.scale, ctx.shared = nf4, scale, x_lora is None
        if skip_base:  # the caller never reads this output (see the module doc); only the graph is needed
            return x.new_empty(*shape[:-1], b.shape[0])
        bias = bias.to(x.dtype) if bias is not None else None
        if nf4 is not None:
            out = (_out_nf4_op if _compiling() else _out_nf4)(x2, *_nf4_args(nf4), bias, xa, b_c, scale)
        else:
            out = (_out_op if _compiling() else _out)(x2, weight, bias, xa, b_c, scale)
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
            adapter = (gb, a_c) if ctx.shared else (None, None)  # the adapter's term of dx, unless dropout split x
            if ctx.nf4 is not None:
                dx = (_dx_nf4_op if _compiling() else _dx_nf4)(g, *_nf4_args(ctx.nf4), *adapter)
            elif ctx.shared:
                dx = (_dx_op if _compiling() else _dx)(g, weight, *adapter)
            else:
                dx = g @ weight
            dx = dx.view(xl.shape)
        if ctx.needs_input_grad[1]:
            dxl = (gb @ a_c).view(xl.shape)
        if ctx.needs_input_grad[5]:
            da = (gb.t() @ xl2).to(a.dtype)
        if ctx.needs_input_grad[6]:
            db = (g.t() @ xa).mul_(s).to(b.dtype)
        return dx, dxl, None, None, None, da, db, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float, impl: str = "fused", nf4: NF4 | None = None) -> torch.Tensor:
    """`x W^T + bias + s (x A^T) B^T` with W frozen (dense, or 4-bit as `nf4`); impl "fused" or "reference"."""
    if impl == "reference":
        return lora_linear_reference(x, _dense(weight, nf4, x.dtype), bias, a, b, scale)
    return _LoRALinear.apply(x, None, weight, nf4, bias, a, b, scale, False)


def _fusable(module) -> str | None:
    """Why a PEFT LoRA Linear cannot take the fused forward, or None when it can."""
    base = module.get_base_layer()
    if type(base) is not nn.Linear and type(base).__name__ != "Linear4bit":
        return f"base layer is {type(base).__name__}"
    if type(base).__name__ == "Linear4bit" and (base.weight.device.type != "cuda" or nf4_of(base.weight) is None):
        return "4-bit base off CUDA (bitsandbytes' CPU kernels repack it)"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    for name in module.active_adapters:
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name):
            return "a LoRA variant (DoRA, ...)"
        if not isinstance(module.lora_dropout[name], (nn.Identity, nn.Dropout)):
            return f"lora_dropout is {type(module.lora_dropout[name]).__name__}"
    return None


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A fused PEFT LoRA Linear's forward (bound by `fuse_lora`): the fused op, or PEFT's own path for what the
    op does not do (merged or disabled adapters, several active adapters, extra arguments)."""
    active = self.active_adapters
    if self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's own path
    name = active[0]
    base = self.get_base_layer()
    nf4 = self._tunery_nf4
    dropout = self.lora_dropout[name]
    x_lora = dropout(x) if isinstance(dropout, nn.Dropout) and dropout.p > 0 and self.training else None
    skip = self._tunery_unread_in_recompute and self._tunery_state.recomputing
    return _LoRALinear.apply(x, x_lora, base.weight if nf4 is None else None, nf4, base.bias,
                             self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], skip)


def fuse_lora(model: nn.Module, unread_in_recompute: tuple[str, ...] = (),
              state: StepState | None = None) -> tuple[list[str], list]:
    """Rebind each fusable PEFT LoRA Linear's forward to the fused op; returns (what was done, undo callables).

    `unread_in_recompute`: name suffixes of layers whose output only feeds the block's last residual add
    (the family's data, models/catalog.py); they skip their base matmul while `state.recomputing` (set by the
    offloaded checkpoint, kernels/offload.py)."""
    state = state or StepState()
    from peft.tuners.lora import LoraLayer

    fused, skipped, undo, unread = 0, {}, [], 0
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
            continue
        why = _fusable(module)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        module._tunery_nf4 = nf4_of(module.get_base_layer().weight)
        module._tunery_unread_in_recompute = module_name.endswith(unread_in_recompute)  # () matches nothing
        module._tunery_state = state
        unread += module._tunery_unread_in_recompute
        module.forward = types.MethodType(fused_forward, module)
        undo.append(lambda m=module: [delattr(m, a) for a in ("forward", "_tunery_nf4", "_tunery_unread_in_recompute",
                                                                "_tunery_state")])
        fused += 1
    done = [f"fused LoRA x{fused} (base + adapter in one op, hand-written backward)"] if fused else []
    if unread:
        done.append(f"{', '.join(unread_in_recompute)} base matmul skipped in recompute x{unread}")
    done += [f"PEFT LoRA kept x{n} ({why})" for why, n in skipped.items()]
    return done, undo
