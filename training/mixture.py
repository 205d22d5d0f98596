"""A weighted mixture of PEFT LoRA adapters with per-row or per-position gates.

Evaluation and joint router/expert training need ``y = base(x) + Σ_k w_k · s_k · B_k A_k x``
on every LoRA module, with weights that differ per sequence (joint training) or per token
position (re-routing every N tokens). PEFT computes ``lora_B(lora_A(x)) * scaling`` for every
*active* adapter; we activate all K adapters and put a forward hook on each adapter's
``lora_B`` module that multiplies its output by that adapter's gate, broadcast over the
rows (``[B, K]`` gates) or rows and positions (``[B, T, K]``).

Why hooks rather than merging per segment with ``add_weighted_adapter(combination_type="cat")``:
a merge builds one new adapter per distinct weight vector (PEFT ~80 ms each, and a new one
every N tokens of every example), while the hook is one multiply per module and gives the
exact same function — ``cat`` concatenates ``w_k·s_k·A_k`` with ``B_k``, which is
``Σ_k w_k s_k B_k A_k`` — and it is differentiable in the gates, which joint training needs.
Zero gates reproduce the base model exactly (the delta is multiplied by 0), and a one-hot gate
reproduces that single adapter, so base / each adapter / routed mixture are all measured by
one model over the same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

log = logging.getLogger(__name__)


class LoraMixture:
    """K adapters loaded onto one base model, mixed by gates set with :meth:`set_gates`."""

    def __init__(self, base_model: nn.Module, adapter_dirs: dict[str, Path], trainable: bool = False) -> None:
        if not adapter_dirs:
            raise ValueError("a mixture needs at least one adapter")
        self.names: list[str] = list(adapter_dirs)
        first, *rest = self.names
        self.model = PeftModel.from_pretrained(
            base_model, str(adapter_dirs[first]), adapter_name=first, is_trainable=trainable
        )
        for name in rest:
            self.model.load_adapter(str(adapter_dirs[name]), adapter_name=name, is_trainable=trainable)
        self.layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        for layer in self.layers:
            present = [n for n in self.names if n in getattr(layer, "lora_A", {})]
            layer.set_adapter(present or self.names[:1], inference_mode=not trainable)
        self._gates: Tensor | None = None
        self._hooks = []
        for layer in self.layers:
            lora_b: nn.ModuleDict = getattr(layer, "lora_B")  # noqa: B009 - typed access to PEFT's dict
            for k, name in enumerate(self.names):
                if name in lora_b:
                    self._hooks.append(lora_b[name].register_forward_hook(self._make_hook(k)))

    def _make_hook(self, k: int):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            gates = self._gates
            if gates is None:
                return output
            g = gates[..., k].to(output.dtype)  # [B] or [B, T]
            if g.dim() == 1:
                return output * g.view(-1, *([1] * (output.dim() - 1)))
            return output * g[:, : output.shape[1]].unsqueeze(-1)

        return hook

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_gates(self, gates: Tensor | None) -> None:
        """``[B, K]`` (one mixture per row), ``[B, T, K]`` (per position) or ``None`` (sum of all)."""
        if gates is not None and gates.shape[-1] != len(self.names):
            raise ValueError(f"gates have {gates.shape[-1]} columns for {len(self.names)} adapters")
        self._gates = None if gates is None else gates.to(self.device)

    def one_hot(self, name: str | None, batch: int) -> Tensor:
        """Gates selecting one adapter (or none: the base model) for ``batch`` rows."""
        g = torch.zeros(batch, len(self.names))
        if name is not None:
            g[:, self.names.index(name)] = 1.0
        return g

    def lora_parameters(self, names: Sequence[str] | None = None) -> list[nn.Parameter]:
        """The LoRA tensors of ``names`` (default all adapters), e.g. for an optimizer group."""
        wanted = set(names or self.names)
        return [
            p
            for n, p in self.model.named_parameters()
            if "lora_" in n and any(f".{a}." in n or n.endswith(f".{a}") for a in wanted)
        ]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def save_adapter(self, name: str, out_dir: Path) -> Path:
        """Save one adapter as a plain PEFT folder (PEFT puts non-default names in a subfolder)."""
        tmp = out_dir / ".peft-save"
        self.model.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
        src = tmp / name if (tmp / name / "adapter_config.json").is_file() else tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (src / f).replace(out_dir / f)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return out_dir
