"""The gated multi-LoRA layer: GPT-2's `Conv1D` left untouched, K adapter slots beside it.

Like PEFT's LoRA layer the base module is wrapped, not modified; unlike PEFT, one forward serves
a batch whose rows each use a different weighted mixture of adapters:

    y = base(x) + Σ_k G[:, k] · s_k · (x A_k) B_k

The scale `s_k` is folded into `B_k` when a slot is filled, and the active slots' factors are
concatenated along the rank axis, so a step costs two matmuls per layer whatever the number of
adapters in the mixture (the `cat` combination of `add_weighted_adapter`, but per row and
without materialising a merged adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from server.engine import cpu_linear


@dataclass
class LoRABatchContext:
    """What every wrapped layer needs for the current forward; set by the engine before each step.

    One object is shared by all layers, so setting the gates once covers the whole model.
    """

    active: tuple[int, ...] = ()  # slot indices used by at least one row of the batch
    gates: torch.Tensor | None = None  # [B, len(active)] per-row weight of each active slot
    rows: torch.Tensor | None = None  # [b] rows with any non-zero gate; None means all rows
    _expanded: dict = field(default_factory=dict)

    def set(self, active: tuple[int, ...], gates: torch.Tensor, rows: torch.Tensor | None) -> None:
        self.active, self.gates, self.rows = active, gates, rows
        self._expanded = {}

    def clear(self) -> None:
        self.active, self.gates, self.rows = (), None, None
        self._expanded = {}

    def gates_for(self, cols: torch.Tensor) -> torch.Tensor:
        """Gates expanded to rank columns, [B, R]: computed once per step for all the layers
        that share a stack layout, not once per module call."""
        key = id(cols)
        hit = self._expanded.get(key)
        if hit is None:
            assert self.gates is not None
            hit = self._expanded[key] = (self.gates[:, cols], cols)  # keep cols alive: its id stays unique
        return hit[0]


class MultiLoRAConv1D(nn.Module):
    """Wraps one `transformers.pytorch_utils.Conv1D` (weight `[in, out]`) with K LoRA slots."""

    max_cached_stacks = 8

    def __init__(self, base: nn.Module, num_slots: int, ctx: LoRABatchContext) -> None:
        super().__init__()
        self.base = base
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        self.in_features, self.out_features = int(weight.shape[0]), int(weight.shape[1])  # Conv1D stores [in, out]
        self.ctx = ctx
        # Per slot: A [in, r], B [r, out] with the adapter's scale folded in; None = slot unused here.
        self.lora_a: list[torch.Tensor | None] = [None] * num_slots
        self.lora_b: list[torch.Tensor | None] = [None] * num_slots
        self._stacks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = {}
        # [out, in] storage of the base weight when oneDNN computes the base matmul (CPU), else None.
        self.weight_t: torch.Tensor | None = None
        if cpu_linear.onednn_available(weight.device, weight.dtype):
            self.weight_t = cpu_linear.transpose_storage(base)

    def _base(self, x2: torch.Tensor) -> torch.Tensor:  # x2 [N, in] -> [N, out]
        """What the wrapped Conv1D computes, `x2 @ W + b`, on the fastest kernel for the device."""
        bias = cast(torch.Tensor, self.base.bias)
        if self.weight_t is not None:
            return cpu_linear.linear(x2, self.weight_t, bias)
        return torch.addmm(bias, x2, cast(torch.Tensor, self.base.weight))

    def set_slot(self, slot: int, a: torch.Tensor | None, b_scaled: torch.Tensor | None) -> None:
        self.lora_a[slot], self.lora_b[slot] = a, b_scaled
        self._stacks.clear()

    def _stack(self, active: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Concatenate the active slots' factors once per distinct active set (cached)."""
        if active in self._stacks:
            return self._stacks[active]
        a_parts, b_parts, cols = [], [], []
        for pos, slot in enumerate(active):
            a, b = self.lora_a[slot], self.lora_b[slot]
            if a is None or b is None:
                continue
            a_parts.append(a)
            b_parts.append(b)
            cols.append(torch.full((a.shape[1],), pos, dtype=torch.long, device=a.device))
        stack = None
        if a_parts:
            stack = (
                torch.cat(a_parts, dim=1),  # [in, R]
                torch.cat(b_parts, dim=0),  # [R, out]
                torch.cat(cols),  # [R] position in `active` of each rank column
            )
        if len(self._stacks) >= self.max_cached_stacks:
            self._stacks.clear()
        self._stacks[active] = stack
        return stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, in]
        ctx = self.ctx
        stack = self._stack(ctx.active) if ctx.active and ctx.gates is not None else None
        B, T = x.shape[0], x.shape[1]
        x2 = x.reshape(B * T, self.in_features)  # [B*T, in]
        y = self._base(x2)  # [B*T, out]  (what Conv1D computes)
        if stack is None:  # no adapter in this batch targets this module
            return y.view(B, T, self.out_features)
        a_cat, b_cat, cols = stack
        gates = ctx.gates_for(cols).to(x.dtype)  # [B, R]
        if ctx.rows is None:
            h = x2 @ a_cat  # [B*T, R]
            h = h * gates if T == 1 else (h.view(B, T, -1) * gates[:, None, :]).view(B * T, -1)
            return y.addmm_(h, b_cat).view(B, T, self.out_features)  # y += h B, in place
        rows = ctx.rows
        delta = ((x[rows] @ a_cat) * gates[rows][:, None, :]) @ b_cat  # [b, T, out]
        return y.view(B, T, self.out_features).index_add(0, rows, delta)


def wrap_targets(model: nn.Module, target_names: set[str], num_slots: int, ctx: LoRABatchContext) -> dict[str, MultiLoRAConv1D]:
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
    return wrapped
