"""The gated multi-LoRA layer: GPT-2's `Conv1D` left untouched, K adapter slots beside it.

Like PEFT's LoRA layer the base module is wrapped, not modified; unlike PEFT, one forward serves
a batch whose rows each use a different weighted mixture of adapters:

    y = base(x) + Σ_k G[:, k] · s_k · (x A_k) B_k

The scale `s_k` is folded into `B_k` when a slot is filled, and the active slots' factors are
concatenated along the rank axis, so a step costs two low-rank matmuls per layer whatever the
number of adapters in the mixture (the `cat` combination of `add_weighted_adapter`, but per row
and without materialising a merged adapter). With bf16 weights on CPU those two are computed in
fp32 (see `MultiLoRAConv1D`). A prefill whose rows each use few of the active adapters takes the
grouped path instead (`MultiLoRAConv1D._forward_grouped`): each adapter's products over its own
rows only, so the LoRA work of a compute-bound prefill follows each row's own rank.

Rows routed by Arrow (`router_core.arrow`, arXiv 2405.11157) get their gates per token and per
layer instead: a separate branch of the forward (`MultiLoRAConv1D._forward_per_token`, taken
only when the context carries `ArrowRows`) scores each such token against the prototypes of
the row's candidate adapters and gates them there; the other rows of the batch keep their row
gates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from router_core.arrow import token_gates
from server.engine import cpu_linear, gpt2
from server.engine.quant import Int8Kind


@dataclass
class ArrowRows:
    """The rows of a forward whose gates each layer decides per token (Arrow).

    Their row of the gate matrix only marks their candidates (> 0); `top_k` and `temperature`
    are per request. Each layer adds the weights it gave (summed over the row's real tokens, up
    to `lengths`) to `weight_sum`, so the engine can report each row's mean weight per adapter
    over the layers after the forward (`mean_weights`)."""

    rows: torch.Tensor  # [a] long, batch rows routed per token
    top_k: torch.Tensor  # [a] long
    temperature: torch.Tensor  # [a] float
    lengths: torch.Tensor | None = None  # [a] real tokens per row in this forward (None: all T)
    host_rows: list[int] = field(default_factory=list)  # `rows` on the host (no device read to name them)
    weight_sum: torch.Tensor | None = None  # [a, active] summed gates over layers and tokens
    _counts: torch.Tensor | None = None  # [a] per row

    def observe(self, weights: torch.Tensor) -> None:  # weights [a, T, E]
        w = weights.detach().float()
        if self.lengths is not None:
            real = torch.arange(w.shape[1], device=w.device)[None, :] < self.lengths[:, None]  # [a, T]
            w = w * real[..., None]
            n = real.sum(1).float()
        else:
            n = torch.full((w.shape[0],), float(w.shape[1]), device=w.device)
        s = w.sum(1)  # [a, E]
        self.weight_sum = s if self.weight_sum is None else self.weight_sum + s
        self._counts = n if self._counts is None else self._counts + n

    def mean_weights(self) -> torch.Tensor | None:
        """[a, active]: each row's gates averaged over the layers and tokens of the forward."""
        if self.weight_sum is None or self._counts is None:
            return None
        return self.weight_sum / self._counts.clamp(min=1)[:, None]


class Stack(NamedTuple):
    """The active slots' factors of one layer, concatenated along the rank axis."""

    a_t: torch.Tensor  # [R, in]: A transposed, what `F.linear` reads (see `_stack`)
    b: torch.Tensor  # [R, out], scales folded in
    cols: torch.Tensor  # [R] long: position in `active` of each rank column
    layout: tuple[tuple[int, int], ...]  # (position in `active`, rank) of each slot with factors here


@dataclass
class LoRABatchContext:
    """What every wrapped layer needs for the current forward.

    One object is shared by all layers, so setting the gates once covers the whole model. The
    engine sets it for one forward at a time with `applied` (a scope, as PEFT's
    `_enable_peft_forward_hooks` scopes its per-call adapter names), so gates never outlive the
    forward they were built for, even when that forward raises.
    """

    active: tuple[int, ...] = ()  # slot indices used by at least one row of the batch
    gates: torch.Tensor | None = None  # [B, len(active)] per-row weight of each active slot
    rows: torch.Tensor | None = None  # [b] rows with any non-zero gate; None means all rows
    arrow: ArrowRows | None = None  # rows gated per token and per layer (None: none)
    _expanded: dict = field(default_factory=dict)
    _groups: list[torch.Tensor] | None = None  # `groups()`, once per forward
    _grouped: bool | None = None

    def set(self, active: tuple[int, ...], gates: torch.Tensor, rows: torch.Tensor | None,
            arrow: ArrowRows | None = None) -> None:
        self.active, self.gates, self.rows, self.arrow = active, gates, rows, arrow
        self._expanded, self._groups, self._grouped = {}, None, None

    def clear(self) -> None:
        self.active, self.gates, self.rows, self.arrow = (), None, None, None
        self._expanded, self._groups, self._grouped = {}, None, None

    def groups(self) -> list[torch.Tensor] | None:
        """Per active position, the batch rows that give it a non-zero gate, when computing
        each adapter over its own rows only saves work (`MultiLoRAConv1D._forward_grouped`):
        the non-zero gates are at most half of the [rows with adapters, active] pairs the
        concatenated path computes (8 rows on 8 different adapters: 8 of 64). CPU gates only
        (reading them is free there; on a GPU it is a host sync per forward), and None otherwise.
        Once per forward, for every layer."""
        if self._grouped is None:
            g = self.gates
            self._grouped = False
            if g is not None and g.device.type == "cpu" and g.shape[1] > 1:
                nonzero = g != 0
                used = int(nonzero.any(1).sum())  # the concatenated path's rows (`rows`)
                if 2 * int(nonzero.sum()) <= used * g.shape[1]:
                    self._groups = [col.nonzero()[:, 0] for col in nonzero.unbind(1)]
                    self._grouped = True
        return self._groups

    @contextmanager
    def applied(self, active: tuple[int, ...] = (), gates: torch.Tensor | None = None,
                rows: torch.Tensor | None = None, arrow: ArrowRows | None = None) -> Iterator[LoRABatchContext]:
        """Set `active`/`gates`/`rows` (and the per-token `arrow` rows) for the forwards inside
        the `with` (no arguments: no adapters, the base model alone), and put back what was
        there before on the way out, however it is left (in the engine: nothing, so no gates are
        left behind for the next caller)."""
        old_active, old_gates, old_rows, old_arrow = self.active, self.gates, self.rows, self.arrow
        if gates is None:
            self.clear()
        else:
            self.set(active, gates, rows, arrow)
        try:
            yield self
        finally:
            if old_gates is None:
                self.clear()
            else:
                self.set(old_active, old_gates, old_rows, old_arrow)

    def gates_for(self, layout: tuple[tuple[int, int], ...], cols: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The gates of the rows with adapters (`rows`) expanded to rank columns, [b, R] in
        `dtype`, and where they are 0 ([b, R] bool, for `gated`).

        Computed once per forward for each column layout (`layout`: the active positions with
        factors in a layer and their ranks, which fixes `cols`), not once per module call: every
        layer an adapter set targets has the same layout, so a routed GPT-2 step expands its
        gates once instead of 36 times (a gather, a row gather and a compare each)."""
        key = (layout, dtype)
        hit = self._expanded.get(key)
        if hit is None:
            assert self.gates is not None
            g = self.gates[:, cols] if self.rows is None else self.gates[self.rows][:, cols]
            g = g.to(dtype)
            hit = self._expanded[key] = (g, g == 0)
        return hit


class MultiLoRAConv1D(nn.Module):
    """Wraps one `transformers.pytorch_utils.Conv1D` (weight `[in, out]`) with K LoRA slots.

    fp32 factors (CPU with oneDNN, bf16 weights, `fp32_factors`): the active stacks are kept in
    fp32 and the two low-rank products computed in fp32 (MKL), the delta added to the bf16 base
    output in one rounding. On this project's CPU (AVX-512 BF16, no AMX) a bf16 matmul of LoRA's
    shapes costs 20-30 µs in oneDNN, several times MKL's fp32 product of the same shape; the bytes
    read grow by the size of the active factors (a few hundred KB per layer for four rank-16
    adapters).
    """

    max_cached_stacks = 8
    # On by default: 2-6 % faster bf16 decode steps at batch 1 on this project's CPU, and the
    # delta is rounded once instead of three times (docs/performance.md).
    fp32_factors = True

    def __init__(self, base: nn.Module, num_slots: int, ctx: LoRABatchContext) -> None:
        super().__init__()
        self.base = base
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        self.in_features, self.out_features = int(weight.shape[0]), int(weight.shape[1])  # Conv1D stores [in, out]
        self.ctx = ctx
        # Per slot: A [in, r], B [r, out] with the adapter's scale folded in; None = slot unused here.
        self.lora_a: list[torch.Tensor | None] = [None] * num_slots
        self.lora_b: list[torch.Tensor | None] = [None] * num_slots
        # Per slot: the adapter's Arrow prototype in this layer, [in] fp32 (router_core.arrow)
        self.protos: list[torch.Tensor | None] = [None] * num_slots
        self._proto_stacks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._stacks: dict[tuple[tuple[int, ...], torch.dtype], Stack | None] = {}
        # [out, in] storage of the base weight when oneDNN computes the base matmul (CPU), else None.
        self.weight_t: torch.Tensor | None = None
        self.int8: Int8Kind | None = None  # `--quant int8`/`w8a8`: the base matmul reads this (quant.quantize_model)
        # dtype of the cached stacks and of the low-rank products (see the class docstring)
        self.factor_dtype = weight.dtype
        if cpu_linear.onednn_available(weight.device, weight.dtype):
            self.weight_t = cpu_linear.transpose_storage(base)
            if self.fp32_factors and weight.dtype == torch.bfloat16:
                self.set_factor_dtype(torch.float32)

    def set_factor_dtype(self, dtype: torch.dtype) -> None:
        """Compute the low-rank products in `dtype` (fp32 or the weight's own)."""
        self.factor_dtype = dtype

    def _base(self, x2: torch.Tensor) -> torch.Tensor:  # x2 [N, in] -> [N, out]
        """What the wrapped Conv1D computes, `x2 @ W + b`, on the fastest kernel for the device."""
        if self.int8 is not None:
            return self.int8.forward(x2)  # not __call__: no hooks here, ~2 µs a call
        bias = cast(torch.Tensor, self.base.bias)
        if self.weight_t is not None:
            return cpu_linear.linear(x2, self.weight_t, bias)
        return torch.addmm(bias, x2, cast(torch.Tensor, self.base.weight))

    def set_slot(self, slot: int, a: torch.Tensor | None, b_scaled: torch.Tensor | None,
                 proto: torch.Tensor | None = None) -> None:
        self.lora_a[slot], self.lora_b[slot] = a, b_scaled
        self.protos[slot] = proto
        self._stacks.clear()
        self._proto_stacks.clear()

    def set_proto(self, slot: int, proto: torch.Tensor | None) -> None:
        """The slot's Arrow prototype in this layer, given on the first Arrow step over it."""
        self.protos[slot] = proto
        self._proto_stacks.clear()

    def _proto_stack(self, active: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototypes of the active slots `[E, in]` (zeros where a slot has none here) and which
        positions have one `[E]` bool; cached per active set like `_stack`."""
        hit = self._proto_stacks.get(active)
        if hit is None:
            ref = next((p for p in self.protos if p is not None), None)
            device = ref.device if ref is not None else cast(torch.Tensor, self.base.weight).device
            rows = [self.protos[s] if self.protos[s] is not None and self.lora_a[s] is not None else None
                    for s in active]
            protos = torch.stack([p if p is not None else torch.zeros(self.in_features, device=device)
                                  for p in rows]).float()
            has = torch.tensor([p is not None for p in rows], device=device)
            if len(self._proto_stacks) >= self.max_cached_stacks:
                self._proto_stacks.clear()
            hit = self._proto_stacks[active] = (protos, has)
        return hit

    def _stack(self, active: tuple[int, ...]) -> Stack | None:
        """Concatenate the active slots' factors once per distinct active set (cached)."""
        key = (active, self.factor_dtype)
        if key in self._stacks:
            return self._stacks[key]
        a_parts, b_parts, cols, layout = [], [], [], []
        for pos, slot in enumerate(active):
            a, b = self.lora_a[slot], self.lora_b[slot]
            if a is None or b is None:
                continue
            layout.append((pos, int(a.shape[1])))
            a_parts.append(a.to(self.factor_dtype).t())
            b_parts.append(b.to(self.factor_dtype))
            cols.append(torch.full((a.shape[1],), pos, dtype=torch.long, device=a.device))
        stack = None
        if a_parts:
            stack = Stack(
                # [R, in]: at one row F.linear over this layout is 1.5-1.8x faster than x @ A over
                # [in, R] (MKL, fp32, cold cache: 97 vs 170 µs for 3072 x 64), 1.2x at eight
                torch.cat(a_parts, dim=0),
                torch.cat(b_parts, dim=0),  # [R, out]
                torch.cat(cols),  # [R] position in `active` of each rank column
                tuple(layout),
            )
        if len(self._stacks) >= self.max_cached_stacks:
            self._stacks.clear()
        self._stacks[key] = stack
        return stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, in]
        ctx = self.ctx
        if ctx.arrow is not None and ctx.active and ctx.gates is not None:
            return self._forward_per_token(x, ctx.arrow)
        stack = self._stack(ctx.active) if ctx.active and ctx.gates is not None else None
        B, T = x.shape[0], x.shape[1]
        x2 = x.reshape(B * T, self.in_features)  # [B*T, in]
        if stack is None:  # no adapter in this batch targets this module
            return self._base(x2).view(B, T, self.out_features)  # what Conv1D computes
        a_t, b_cat, cols, layout = stack
        if T > 1 and len(layout) > 1 and (groups := ctx.groups()) is not None:
            return self._forward_grouped(x, stack, groups)
        g, zero = ctx.gates_for(layout, cols, b_cat.dtype)  # [b, R] each
        rows = ctx.rows
        y = self._base(x2)  # [B*T, out]
        xa = x2 if rows is None else x[rows].reshape(-1, self.in_features)
        if xa.dtype != a_t.dtype:  # fp32 factors beside bf16 weights (a no-op `.to` costs ~2 µs)
            xa = xa.to(a_t.dtype)
        native = self.int8.native if self.int8 is not None else None
        if native is not None and T == 1 and rows is None and y.dtype == a_t.dtype == torch.float32:
            # `--quant` decode on CPU: both products on the native kernels beside the int8 base
            # (0.73x the time of F.linear + addmm_ here, docs/performance.md); float modes keep torch's
            h = gated(native.lora_down(xa, a_t), g, T, zero)  # [B, R]
            return native.lora_up_(y, h, b_cat).view(B, T, self.out_features)
        h = gated(F.linear(xa, a_t), g, T, zero)  # [b*T, R]; a_t and b_cat share the factor dtype
        if rows is not None:
            delta = (h @ b_cat).view(-1, T, self.out_features).to(y.dtype)  # [b, T, out]
            return y.view(B, T, self.out_features).index_add(0, rows, delta)
        if b_cat.dtype != y.dtype:  # fp32 factors: the delta in fp32, rounded once into y
            return y.add_(h @ b_cat).view(B, T, self.out_features)
        return y.addmm_(h, b_cat).view(B, T, self.out_features)  # y += h B, in place

    def _forward_grouped(self, x: torch.Tensor, stack: Stack, groups: list[torch.Tensor]) -> torch.Tensor:
        """A prefill (T > 1) whose rows use few of the active adapters each (`ctx.groups`): each
        adapter's two low-rank products over the tokens of its own rows only, added back to those
        rows, so LoRA work follows each row's own rank, as Punica's SGMV / S-LoRA do for a
        prefill, instead of every token against every active adapter's columns (8 rows on 8
        adapters: an eighth of the concatenated path's products). Decode steps (T = 1) keep the
        concatenated path: they read every active factor once either way, in two calls instead
        of two per adapter. A row without weight on an adapter never meets its product, so an
        overflowing adapter reaches only the rows that weight it (as `gated` ensures below).
        With fp32 factors beside bf16 weights the delta is summed in fp32 and rounded once.
        Measured (CPU time, 1 thread, shared machine): an 8-row, 64-token prefill of the 36
        projections on 8 adapters went from 1.18x to 1.10x the time of the same rows on one
        adapter (docs/performance.md)."""
        ctx = self.ctx
        assert ctx.gates is not None
        B, T = x.shape[0], x.shape[1]
        y = self._base(x.reshape(B * T, self.in_features))  # [B*T, out]
        a_t, b_cat, _, layout = stack
        # fp32 factors beside bf16 weights: the delta summed in fp32 and rounded into y once;
        # factors in y's dtype: added into y directly, as the concatenated path's addmm_ does
        same = b_cat.dtype == y.dtype
        delta = y.view(B, T, self.out_features) if same else \
            torch.zeros(B, T, self.out_features, dtype=b_cat.dtype, device=y.device)
        at = 0
        for pos, r in layout:
            a, b, at = a_t[at:at + r], b_cat[at:at + r], at + r
            rows = groups[pos]
            if rows.numel() == 0:
                continue
            g = ctx.gates[rows, pos].to(b.dtype)  # [n]
            h = F.linear(x[rows].reshape(-1, self.in_features).to(a.dtype), a)  # [n*T, r]
            h = (h.view(-1, T, r) * g[:, None, None]).view(-1, r)
            delta.index_add_(0, rows, (h.to(b.dtype) @ b).view(-1, T, self.out_features))
        if same:
            return delta
        return y.add_(delta.view(B * T, self.out_features)).view(B, T, self.out_features)

    def _forward_per_token(self, x: torch.Tensor, arrow: ArrowRows) -> torch.Tensor:
        """The forward when some rows are gated per token (Arrow): every row's gates are
        expanded to its tokens `[B, T, E]`, the Arrow rows' replaced by `token_gates` over their
        candidates (their gate-matrix entries > 0, and adapters with weights in this layer);
        then the same two low-rank products as the row-gated path."""
        ctx = self.ctx
        assert ctx.gates is not None
        B, T = x.shape[0], x.shape[1]
        x2 = x.reshape(B * T, self.in_features)  # [B*T, in]
        y = self._base(x2)  # [B*T, out]
        stack = self._stack(ctx.active)
        if stack is None:  # no active adapter targets this module
            return y.view(B, T, self.out_features)
        a_t, b_cat, cols, _ = stack
        protos, has = self._proto_stack(ctx.active)  # [E, in], [E]
        gates = ctx.gates.to(b_cat.dtype)  # [B, E]
        per_token = gates[:, None, :].expand(B, T, gates.shape[1]).clone()  # [B, T, E]
        candidates = (gates[arrow.rows] > 0) & has[None, :]  # [a, E]
        w = token_gates(x[arrow.rows], protos.to(x.device), candidates, arrow.top_k, arrow.temperature)  # [a, T, E]
        arrow.observe(w)
        per_token[arrow.rows] = w.to(per_token.dtype)
        h = F.linear(x2.to(a_t.dtype), a_t) * per_token.view(B * T, -1)[:, cols]  # [B*T, R]
        return y.add_((h.to(b_cat.dtype) @ b_cat).to(y.dtype)).view(B, T, self.out_features)


def gated(h: torch.Tensor, g: torch.Tensor, T: int, zero: torch.Tensor | None = None) -> torch.Tensor:
    """`h * g` per rank column (h [b*T, R], g [b, R]), exactly 0 wherever the gate is 0.

    A plain product is not enough: an adapter whose `x A` overflowed the serving dtype gives inf
    in its columns, and inf x 0 = NaN, so every row of the batch that gave it no weight would
    fail with it. Masking costs one elementwise pass over a [b*T, R] tensor and leaves finite
    products bit for bit as they were; a non-finite delta reaches only the rows that weighted it.
    `zero`: `g == 0`, when the caller has it (`LoRABatchContext.gates_for` computes it once a step).
    """
    if zero is None:
        zero = g == 0
    if T == 1:
        return (h * g).masked_fill_(zero, 0)
    R = h.shape[1]
    return (h.view(-1, T, R) * g[:, None, :]).masked_fill_(zero[:, None, :], 0).view(-1, R)


def wrap_targets(model: nn.Module, target_names: set[str], num_slots: int,
                 ctx: LoRABatchContext) -> dict[str, MultiLoRAConv1D]:
    """Replace every Conv1D whose attribute name is in `target_names` by a MultiLoRAConv1D.

    Returns the wrappers by their full module path (e.g. `transformer.h.0.attn.c_attn`), the
    same keys PEFT's safetensors use after `base_model.model.`.
    """
    from transformers.pytorch_utils import Conv1D

    wrapped: dict[str, MultiLoRAConv1D] = {}
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in target_names and isinstance(child, Conv1D):
                wrapper = MultiLoRAConv1D(child, num_slots, ctx)
                setattr(module, child_name, wrapper)
                wrapped[f"{path}.{child_name}" if path else child_name] = wrapper
    gpt2.forget(model)  # its forward read the old modules' `forward`s
    return wrapped
