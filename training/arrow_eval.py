"""The Arrow router (arXiv 2405.11157, `router_core.arrow`) in ``switchboard-train eval``.

Arrow has no embedding and no route vector: each LoRA layer gates each token itself. So it is
evaluated on the same :class:`training.mixture.LoraMixture` as the other routers, with the
mixture's own gates off (every adapter's delta passes) and a forward pre-hook per LoRA layer
that computes the layer's per-token Arrow gates from its input (`router_core.arrow.token_gates`,
the server's function) and a hook on each adapter's ``lora_B`` that multiplies by them. Teacher
forcing with per-token gates equals decoding, as a token's gates depend only on its own input.

Its routing decision for a text, for accuracy and calibration, is each adapter's weight
averaged over the layers and the text's tokens (what the server's trace reports).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from router_core.arrow import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, prototype, token_gates


class ArrowGates:
    """Arrow on a LoraMixture's layers; off until `applied`."""

    kind = "arrow"

    def __init__(self, mixture: Any, top_k: int = DEFAULT_TOP_K, temperature: float = DEFAULT_TEMPERATURE) -> None:
        self.mixture, self.top_k, self.temperature = mixture, int(top_k), float(temperature)
        self.adapter_names = tuple(mixture.names)
        self.enabled = False
        self.collect = False  # sum the gates (text_weights); off for perplexity batches of any size
        self.sums: Tensor | None = None  # [B, K] gates summed over layers and real tokens
        self.mask: Tensor | None = None  # [B, T] real tokens of the batch (None: all)
        self._hooks: list[Any] = []
        K = len(mixture.names)
        for layer in mixture.layers:
            present = [k for k, n in enumerate(mixture.names) if n in getattr(layer, "lora_A", {})]
            if not present:
                continue
            ref = layer.lora_A[mixture.names[present[0]]].weight  # [r, in]
            protos = torch.zeros(K, ref.shape[1], device=ref.device)
            has = torch.zeros(K, dtype=torch.bool, device=ref.device)
            for k in present:
                name = mixture.names[k]
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # PEFT: [r, in], [out, r]
                protos[k], has[k] = prototype(a.t(), b.t()), True
            state: dict[str, Tensor | None] = {"g": None}
            self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(protos, has, state)))
            for k in present:
                self._hooks.append(layer.lora_B[mixture.names[k]].register_forward_hook(self._gate_hook(k, state)))

    def _pre_hook(self, protos: Tensor, has: Tensor, state: dict[str, Tensor | None]):
        def hook(module: Any, args: tuple) -> None:
            if not self.enabled:
                state["g"] = None
                return
            x = args[0]  # [B, T, in]
            B = x.shape[0]
            g = token_gates(x.detach(), protos, has[None].expand(B, -1),
                            torch.full((B,), self.top_k, device=x.device),
                            torch.full((B,), self.temperature, device=x.device))  # [B, T, K]
            state["g"] = g
            if not self.collect:
                return
            real = g if self.mask is None else g * self.mask[:, : g.shape[1], None].to(g.dtype)
            s = real.sum(1).cpu()  # [B, K]
            self.sums = s if self.sums is None else self.sums + s
        return hook

    @staticmethod
    def _gate_hook(k: int, state: dict[str, Tensor | None]):
        def hook(module: Any, inputs: Any, output: Tensor) -> Tensor:
            g = state["g"]
            return output if g is None else output * g[..., k].unsqueeze(-1).to(output.dtype)
        return hook

    @contextmanager
    def applied(self) -> Iterator[ArrowGates]:
        """Arrow's gates for the forwards inside the `with` (the mixture's own gates off)."""
        self.mixture.set_gates(None)
        self.enabled, self.sums = True, None
        try:
            yield self
        finally:
            self.enabled, self.collect, self.mask = False, False, None

    @torch.no_grad()
    def text_weights(self, tokenizer: Any, texts: list[str], max_length: int) -> Tensor:
        """Each text's mean weight per adapter over the layers and its tokens, `[N, K]`."""
        device = self.mixture.device
        out: list[Tensor] = []
        with self.applied():
            self.collect = True
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"] or [tokenizer.eos_token_id]
                self.sums = None
                self.mixture.model(input_ids=torch.tensor([ids], device=device))
                assert self.sums is not None
                s = self.sums[0]
                out.append(s / s.sum().clamp_min(1e-12))
        return torch.stack(out)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def arrow_perplexity(ev: Any, arrow: ArrowGates, domain: str) -> float:
    """Perplexity of `domain`'s evaluation set with Arrow's gates (teacher-forced, as the others)."""
    from training.lm import mean_token_nll, perplexity

    with arrow.applied():
        nll = mean_token_nll(arrow.mixture.model, ev.datasets[domain], ev.tokenizer.pad_token_id, ev.cfg.batch_size)
    return perplexity(nll)
