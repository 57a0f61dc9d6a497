"""LoRA projections that share an input (q/k/v, gate/up) as one matmul with the adapters inside it.

    y_i = x W_i^T (+ b_i) + s_i (x A_i^T) B_i^T        for each member i of a group, x (N, in) shared

kernels/lora.py computes each projection as two matmuls into one buffer: the rank-r product writes the whole
(N, out) output, the base matmul adds into it. That output is written twice and read once more, which costs
more than the rank-r product itself: on Llama-3.2-1B's gate/up, 16% over the base matmuls alone
(bench/lora_layouts.py). Here the adapters ride inside the base matmul instead, as extra columns of K:

    [y_1 | ... | y_m] = [x | x A_1^T | ... | x A_m^T] @ S_fwd^T                  K = in + R, R = sum of ranks
    dx = [dy_1 | ... | dy_m | g_1 | ... | g_m] @ S_bwd       g_i = s_i dy_i B_i   (or chained: see below)

One buffer S, (O + R, in + R) with O = sum of the members' widths, holds the group's frozen base weights and
bf16 copies of its adapters:

    S = [[W_1, s_1 B_1, 0 ], [W_2, 0, s_2 B_2], [A_1, .. ], [A_2, .. ]]   S_fwd = S[:O, :], S_bwd = S[:, :in]

The members' base weights become views of S (`weight.data`), so the model holds no second copy; undo gives each
its own contiguous tensor back. The adapter slots are refreshed from the PEFT parameters by a forward pre-hook
on the decoder whenever those changed (an optimizer step, a loaded checkpoint); the parameters stay the trained
ones, in their own dtype, and get their gradients from this op's backward.

Backward: dB_i = s_i dy_i^T (x A_i^T), dA_i = g_i^T x. For dx, widening dy into one buffer copies it; that pays
for q/k/v (width about the input's) but not for gate/up (several times wider): there the group's rank-r
products write dx and each base matmul adds into it (`FastPathOptions.group_kcat_backward_max_width`). On the H100,
q/k/v (1.3-1.5x its input's width) gained 12-36% with the widened buffer; gate/up (7-11x) lost up to 46% with it
and gained 4-13% chained. Measured per layout and shape with bench/lora_layouts.py (docs/benchmarks-history.md).

HF's modules call the members one by one (`q_proj(x)`, then `k_proj(x)`, ...). The first member computes the
whole group and leaves the others' outputs on the group; a member called with that same `x` takes its output,
any other call computes its own projection alone (kernels/lora.py), so an unexpected order is slower, never
wrong. Under torch.compile the two buffer-building steps are opaque ops (`tunery::lora_group_out`,
`lora_group_dx`, `lora_group_dx_chain`) for the reason kernels/lora.py gives: traced, their in-place writes
would be functionalized into copies of the whole buffer.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from tunery.kernels import lora
from tunery.kernels.options import FastPathOptions, StepState


def _out(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor) -> list[torch.Tensor]:
    """(xa, y): xa = x A^T (N, R), y = [x | xa] S_fwd^T (+ bias) (N, O). `w` is S_fwd, `a` the A rows of S. The
    widened input lives only for the matmul: backward keeps `x` (which the model holds anyway) and the small `xa`."""
    n, width = x.shape
    xa = x @ a.t()
    xcat = x.new_empty(n, width + a.shape[0])
    xcat[:, :width].copy_(x)
    xcat[:, width:].copy_(xa)
    y = torch.addmm(bias, xcat, w.t()) if bias is not None else xcat @ w.t()
    return [xa, y]


def _dx(grads: list[torch.Tensor], gb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[dy_1 | ... | dy_m | gb] @ S_bwd: every dy copied into one (N, O + R) buffer, then one matmul."""
    gcat = gb.new_empty(gb.shape[0], w.shape[0])
    col = 0
    for g in grads:
        gcat[:, col:col + g.shape[1]].copy_(g)
        col += g.shape[1]
    gcat[:, col:].copy_(gb)
    return gcat @ w


def _dx_chain(grads: list[torch.Tensor], gb: torch.Tensor, a: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """gb @ [A_1; ...; A_m] + sum dy_i W_i, each base matmul adding into the rank-r product's output."""
    dx = gb @ a
    for g, w in zip(grads, ws):
        dx.addmm_(g, w)
    return dx


_LIB = torch.library.Library("tunery", "FRAGMENT")  # low-level registration: see kernels/lora.py
_LIB.define("lora_group_out(Tensor x, Tensor w, Tensor? bias, Tensor a) -> Tensor[]")
_LIB.define("lora_group_dx(Tensor[] grads, Tensor gb, Tensor w) -> Tensor")
_LIB.define("lora_group_dx_chain(Tensor[] grads, Tensor gb, Tensor a, Tensor[] ws) -> Tensor")
_LIB.impl("lora_group_out", _out, "CompositeExplicitAutograd")
_LIB.impl("lora_group_dx", _dx, "CompositeExplicitAutograd")
_LIB.impl("lora_group_dx_chain", _dx_chain, "CompositeExplicitAutograd")
torch.library.register_fake(
    "tunery::lora_group_out",
    lambda x, w, bias, a: [x.new_empty(x.shape[0], a.shape[0]), x.new_empty(x.shape[0], w.shape[0])], lib=_LIB)
torch.library.register_fake("tunery::lora_group_dx", lambda grads, gb, w: gb.new_empty(gb.shape[0], w.shape[1]),
                            lib=_LIB)
torch.library.register_fake("tunery::lora_group_dx_chain",
                            lambda grads, gb, a, ws: gb.new_empty(gb.shape[0], a.shape[1]), lib=_LIB)
_OPS = torch.ops.tunery


class _Group:
    """One group's members (in call order), the buffer S, and what is needed to keep its adapter slots fresh."""

    def __init__(self, members: list, adapter: str, apart: list[bool], kcat_backward_max_width: float = 2.0,
                 state: StepState | None = None):
        self.state = state or StepState()
        self.members, self.adapter, self.apart = members, adapter, apart
        bases = [m.get_base_layer() for m in members]
        self.width = bases[0].in_features
        self.outs = [b.out_features for b in bases]
        self.ranks = [m.lora_A[adapter].weight.shape[0] for m in members]
        self.scales = [float(m.scaling[adapter]) for m in members]
        self.o, rank = sum(self.outs), sum(self.ranks)
        self.rows = _spans(self.outs)  # each member's rows of S[:O] (its output's columns)
        self.cols = _spans(self.ranks)  # each member's rank columns after `in` (and rows of A after O)
        w0 = bases[0].weight
        self.s = torch.zeros(self.o + rank, self.width + rank, dtype=w0.dtype, device=w0.device)
        self.bias = None
        if bases[0].bias is not None:
            self.bias = torch.cat([b.bias.detach() for b in bases])
        for b, (r0, r1) in zip(bases, self.rows):
            self.s[r0:r1, :self.width].copy_(b.weight.detach())
            b.weight.data = self.s[r0:r1, :self.width]  # the model's base weight now lives in S
            if self.bias is not None:
                b.bias.data = self.bias[r0:r1]
        self.kcat_backward = self.o <= kcat_backward_max_width * self.width
        self.dtypes = [(m.lora_A[adapter].weight.dtype, m.lora_B[adapter].weight.dtype) for m in members]
        self.versions = None
        self.pending = None  # (x, outputs) between the first member's call and the last's
        self.sync()

    def _params(self) -> list[nn.Parameter]:
        return [p for m in self.members for p in (m.lora_A[self.adapter].weight, m.lora_B[self.adapter].weight)]

    @torch.no_grad()
    def sync(self, captured: bool | None = None) -> None:
        """Copy the adapters into S if any changed since the last copy (in-place updates bump `_version`). Under a
        CUDA graph capture (kernels/graphs.py) the copy is queued, not run: it is always queued, so that every
        replay refreshes S, and S is not marked up to date, so that after a failed capture the next eager forward
        copies for real. `captured`: whether a capture is on, if the caller knows."""
        params = self._params()
        versions = [(id(p), p._version) for p in params]
        captured = self.state.in_capture() if captured is None else captured
        if versions == self.versions and not captured:
            return
        o, width = self.o, self.width
        for a, b, (r0, r1), (c0, c1), scale in zip(params[::2], params[1::2], self.rows, self.cols, self.scales):
            self.s[o + c0:o + c1, :width].copy_(a)
            self.s[r0:r1, width + c0:width + c1].copy_(b * scale)
        self.versions = None if captured else versions

    def ready(self) -> bool:
        """Whether every member would take kernels/lora.py's fused path with no LoRA dropout in play."""
        for m in self.members:
            if m.disable_adapters or m.merged or list(m.active_adapters) != [self.adapter]:
                return False
            dropout = m.lora_dropout[self.adapter]
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and m.training:
                return False
        return True

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every member's output for input `x` (..., in): views of one (N, O) buffer, or a copy for members
        `apart` (an output kept for backward as it is would keep the whole buffer, and the attention stash
        would copy all of it to the host)."""
        params = self._params()
        outs = _LoRAGroup.apply(x, self, *params)
        return tuple((o.clone() if apart else o).view(*x.shape[:-1], o.shape[-1]) for o, apart in zip(outs, self.apart))

    def restore(self) -> None:
        """Give each member's base weight (and bias) its own contiguous tensor again."""
        for m, (r0, r1) in zip(self.members, self.rows):
            base = m.get_base_layer()
            base.weight.data = self.s[r0:r1, :self.width].clone()
            if self.bias is not None:
                base.bias.data = self.bias[r0:r1].clone()
        self.s = self.bias = self.pending = None


class _LoRAGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group: _Group, *params):
        x2 = x.reshape(-1, x.shape[-1])
        w, a = group.s[:group.o], group.s[group.o:, :group.width]
        bias = group.bias.to(x.dtype) if group.bias is not None else None
        xa, y = (_OPS.lora_group_out.default if lora._compiling() else _out)(x2, w, bias, a)
        ctx.save_for_backward(x, xa, group.s)
        ctx.group = group
        return tuple(y.split(group.outs, dim=1))

    @staticmethod
    def backward(ctx, *grads):
        x, xa, s = ctx.saved_tensors
        group = ctx.group
        width, o = group.width, group.o
        x2 = x.reshape(-1, width)
        gs = [g.reshape(-1, out) if g is not None else x2.new_zeros(x2.shape[0], out)
              for g, out in zip(grads, group.outs)]
        gbs, dparams = [], []
        for g, (r0, r1), (c0, c1), scale in zip(gs, group.rows, group.cols, group.scales):
            gbs.append(g @ s[r0:r1, width + c0:width + c1])  # (N, r) = s dy B (the slot holds s B)
            dparams.append((g.t() @ xa[:, c0:c1]).mul_(scale))  # (out, r) = s dy^T (x A^T)
        gb = torch.cat(gbs, dim=1)  # (N, R)
        da = (gb.t() @ x2).split(group.ranks)  # (R, in) = g^T x, per member
        grads_out = []
        for d_a, d_b, (t_a, t_b) in zip(da, dparams, group.dtypes):
            grads_out += [d_a.to(t_a), d_b.to(t_b)]
        dx = None
        if ctx.needs_input_grad[0]:
            compiling = lora._compiling()
            if group.kcat_backward:
                dx = (_OPS.lora_group_dx.default if compiling else _dx)(gs, gb, s[:, :width])
            else:
                ws = [s[r0:r1, :width] for r0, r1 in group.rows]
                dx = (_OPS.lora_group_dx_chain.default if compiling else _dx_chain)(gs, gb, s[o:, :width], ws)
            dx = dx.view(x.shape)
        return (dx, None, *grads_out)


def _grouped_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    group, index = self._tunery_group
    if not args and not kwargs and group.ready():
        if index == 0:
            outs = group.run(x)
            group.pending = (x, outs)
            return outs[0]
        pending = group.pending
        if pending is not None and pending[0] is x:
            if index == len(group.members) - 1:
                group.pending = None
            return pending[1][index]
    return lora.fused_forward(self, x, *args, **kwargs)  # alone: kernels/lora.py's op (or PEFT's path)


def group_lora(model: nn.Module, groups: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...],
               hook_on: nn.Module, options: FastPathOptions | None = None,
               state: StepState | None = None) -> tuple[list[str], list]:
    """Group the fused LoRA projections named in `groups` that share an input: (parent suffix, member names in
    call order, members whose output gets its own memory; the family's data, models/catalog.py). Returns (what
    was done, undo callables). Run after `lora.fuse_lora`. `hook_on`: the module whose forward pre-hook refreshes the
    adapter slots (the decoder). `options`: group_max_width and group_kcat_backward_max_width; `state`: tells a
    CUDA graph capture apart from a run."""
    options, state = options or FastPathOptions(), state or StepState()
    built: list[_Group] = []
    names = []
    for name, module in model.named_modules():
        for parent, members, apart in groups:
            if not name.endswith(parent):
                continue
            layers = [getattr(module, m, None) for m in members]
            if _groupable(layers, options.group_max_width):
                built.append(_Group(layers, layers[0].active_adapters[0], [m in apart for m in members],
                                    options.group_kcat_backward_max_width, state))
                names.append("/".join(members))
    if not built:
        return [], []
    for group in built:
        for i, m in enumerate(group.members):
            m._tunery_group = (group, i)
            m.forward = types.MethodType(_grouped_forward, m)
    handle = hook_on.register_forward_pre_hook(lambda *_: _refresh(built, state))

    def undo():
        handle.remove()
        for group in built:
            for m in group.members:
                del m._tunery_group
                m.forward = types.MethodType(lora.fused_forward, m)
            group.restore()

    kinds = sorted(set(names))
    return [f"LoRA groups with the adapters inside one matmul ({', '.join(kinds)}) x{len(built)}"], [undo]


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of these sizes, from 0."""
    stops = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return [(stop - size, stop) for size, stop in zip(sizes, stops)]


def _refresh(groups: list[_Group], state: StepState) -> None:
    """Before each forward of the model: fresh adapter slots, and no outputs left from a call that ended early."""
    captured = state.in_capture()  # once per forward, not per group
    for group in groups:
        group.pending = None
        group.sync(captured)


def _groupable(layers: list, max_width: int) -> bool:
    """Fused (kernels/lora.py), dense, one active adapter, same input width (at most `max_width`), dtype and
    device, bias alike. Wider inputs gain little for the buffer's extra memory: on the H100, Llama-3.2-1B (2048)
    gained 5.8% for 0.02 GiB of peak, Qwen2.5-0.5B (896) 10%, Llama-3.1-8B (4096) about 1% for 0.09 GiB, which
    put its peak above Unsloth's (docs/benchmarks-history.md)."""
    if any(m is None or getattr(m, "_tunery_nf4", 1) is not None or m.in_features > max_width for m in layers):
        return False
    if any(len(m.active_adapters) != 1 or m.active_adapters[0] != layers[0].active_adapters[0] for m in layers):
        return False
    bases = [m.get_base_layer() for m in layers]
    w0 = bases[0].weight
    return all(type(b) is nn.Linear and b.in_features == bases[0].in_features and b.weight.dtype == w0.dtype
               and b.weight.device == w0.device and (b.bias is None) == (bases[0].bias is None) for b in bases)
