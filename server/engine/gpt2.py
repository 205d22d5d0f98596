"""GPT-2's forward pass over the engine's KV cache, calling the HF model's own modules.

The weights (and the LoRA wrappers around the Conv1D projections) stay in the HF
`GPT2LMHeadModel`; this function only replaces the attention's cache handling, so one call
serves both a prefill (rows of right-padded prompts) and a batched decode step (B rows, one
token each, every row at its own position).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from server.engine import cpu_linear
from server.engine.kv_cache import KVCache


def lm_head(model: GPT2LMHeadModel, h: torch.Tensor) -> torch.Tensor:  # h [..., d] -> [..., V]
    """The tied LM head: its int8 copy under `--quant int8`/`w8a8` (`quant.quantize_model`); else on CPU
    through oneDNN, ~2.5x faster than F.linear at 8 rows (see `cpu_linear`). The tied embedding
    is already [V, d], the layout oneDNN wants."""
    q = getattr(model, "lm_head_int8", None)
    if q is not None:
        return q(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)
    if h.dim() != 2:
        return model.lm_head(h)
    w = model.lm_head.weight
    if cpu_linear.onednn_available(h.device, h.dtype) and w.is_contiguous():
        return cpu_linear.linear(h, w, model.lm_head.bias)
    return model.lm_head(h)


# GPT-2's activation, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): HF computes it as seven
# element-wise ops in Python (`NewGELUActivation`); this is the same function in one kernel.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def mlp(block: Any, h: torch.Tensor, activation: str) -> torch.Tensor:
    """The block's MLP (dropout is off in eval)."""
    m = block.mlp
    if activation in TANH_GELU:
        return m.c_proj(F.gelu(m.c_fc(h), approximate="tanh"))
    return m(h)


def forward(
    model: GPT2LMHeadModel,
    input_ids: torch.Tensor,  # [B, T]
    positions: torch.Tensor,  # [B, T] absolute position of every token
    cache: KVCache,
    row_start: int = 0,
    all_logits: bool = False,
    last: torch.Tensor | None = None,  # [B] index of each row's last real token (right padding)
    logits: bool = True,  # False: hidden states only (the router's base-model pass)
    starts: list[int] | None = None,  # [B] positions[:, 0], from the host (the engine's rows know them)
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Return (logits, hidden): logits [B, T, V] if `all_logits` else [B, V] of each row's last
    token (None when `logits` is False); hidden [B, T, d] is the final layer-normed hidden state
    (the `base` embedder's input).

    Each row's positions run on from its first, `positions[b, t] == positions[b, 0] + t` (a
    right-padded prefill from 0, or one decode token). `starts`, the host's copy of
    `positions[:, 0]`, spares three device reads (where to write, whether rows are aligned, how
    many keys to attend to), each a host sync per forward on a GPU; without it they are read
    off `positions`."""
    tr: Any = model.transformer  # HF's module attributes are untyped
    cfg = model.config
    B, T = input_ids.shape
    d, act = cfg.n_embd, cfg.activation_function  # read once: a config attribute costs ~1 µs a read
    H, hd = cfg.n_head, d // cfg.n_head
    dev = input_ids.device
    rows = slice(row_start, row_start + B)
    first = positions[:, 0]  # [B]
    if starts is None:  # three device reads (host syncs on a GPU)
        start = int(first[0])
        aligned = bool((first == start).all())  # every row at the same position (e.g. batch 1)
        L = int(positions.max()) + 1  # keys to attend to, in this row slice
    else:
        if len(starts) != B:
            raise ValueError(f"{len(starts)} start positions for {B} rows")
        start, aligned, L = starts[0], all(s == starts[0] for s in starts), max(starts) + T
    x = tr.wte(input_ids) + tr.wpe(positions)  # [B, T, d]
    fresh_prefill = T > 1 and aligned and start == 0  # right-padded prompts from position 0
    mask = None
    if not fresh_prefill and not (T == 1 and aligned):
        key_pos = torch.arange(L, device=dev)
        mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, L] causal per row
    row_idx = torch.arange(row_start, row_start + B, device=dev) if T == 1 and not aligned else None
    for layer, block in enumerate(tr.h):
        attn = block.attn
        h = block.ln_1(x)
        q, k, v = attn.c_attn(h).split(d, dim=2)  # each [B, T, d]
        q = q.view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, H, hd).transpose(1, 2)
        v = v.view(B, T, H, hd).transpose(1, 2)
        ck, cv = cache.keys[layer], cache.values[layer]  # [Bcap, H, Tcap, hd]
        if row_idx is not None:  # decode, rows at different positions
            ck[row_idx, :, first] = k[:, :, 0]
            cv[row_idx, :, first] = v[:, :, 0]
        else:
            ck[rows, :, start:start + T] = k
            cv[rows, :, start:start + T] = v
        if fresh_prefill:  # plain causal attention over the prompts themselves, no mask or cache read
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
        else:  # mask is None when all rows decode at one position: every cached key is visible
            y = F.scaled_dot_product_attention(q, ck[rows, :, :L], cv[rows, :, :L], attn_mask=mask,
                                               scale=attn.scaling)
        y = y.transpose(1, 2).reshape(B, T, d)  # [B, T, d]
        x = x + attn.c_proj(y)
        x = x + mlp(block, block.ln_2(x), act)
    hidden = tr.ln_f(x)  # [B, T, d]
    if not logits:
        return None, hidden
    if all_logits:
        return lm_head(model, hidden), hidden  # [B, T, V]
    final = hidden[:, -1] if last is None else hidden[torch.arange(B, device=dev), last]  # [B, d]
    return lm_head(model, final), hidden  # [B, V]
