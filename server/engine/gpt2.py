"""GPT-2's forward pass over the engine's KV cache, calling the HF model's own modules.

The weights (and the LoRA wrappers around the Conv1D projections) stay in the HF
`GPT2LMHeadModel`; this function only replaces the attention's cache handling, so one call
serves both a prefill (one row, T prompt tokens) and a batched decode step (B rows, one token
each, every row at its own position).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from server.engine.kv_cache import KVCache


def forward(
    model: GPT2LMHeadModel,
    input_ids: torch.Tensor,  # [B, T]
    positions: torch.Tensor,  # [B, T] absolute position of every token
    cache: KVCache,
    row_start: int = 0,
    all_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits, hidden): logits [B, T, V] if `all_logits` else [B, V] of the last token;
    hidden [B, T, d] is the final layer-normed hidden state (the `base` embedder's input)."""
    tr: Any = model.transformer  # HF's module attributes are untyped
    cfg = model.config
    B, T = input_ids.shape
    H, hd = cfg.n_head, cfg.n_embd // cfg.n_head
    rows = slice(row_start, row_start + B)
    L = int(positions.max()) + 1  # keys to attend to, in this row slice
    x = tr.wte(input_ids) + tr.wpe(positions)  # [B, T, d]
    key_pos = torch.arange(L, device=input_ids.device)
    mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, L] causal per row
    single_prefill = B == 1 and T > 1 and int(positions[0, 0]) == 0
    for layer, block in enumerate(tr.h):
        attn = block.attn
        h = block.ln_1(x)
        q, k, v = attn.c_attn(h).split(cfg.n_embd, dim=2)  # each [B, T, d]
        q = q.view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, H, hd).transpose(1, 2)
        v = v.view(B, T, H, hd).transpose(1, 2)
        ck, cv = cache.keys[layer], cache.values[layer]  # [Bcap, H, Tcap, hd]
        if T == 1:
            idx = torch.arange(row_start, row_start + B, device=input_ids.device)
            ck[idx, :, positions[:, 0]] = k[:, :, 0]
            cv[idx, :, positions[:, 0]] = v[:, :, 0]
        else:
            start = int(positions[0, 0])
            ck[rows, :, start:start + T] = k
            cv[rows, :, start:start + T] = v
        scale = attn.scaling
        if single_prefill:  # plain causal attention over the prompt, no mask tensor needed
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, ck[rows, :, :L], cv[rows, :, :L], attn_mask=mask, scale=scale)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_embd)  # [B, T, d]
        x = x + attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    hidden = tr.ln_f(x)  # [B, T, d]
    if all_logits:
        return model.lm_head(hidden), hidden  # [B, T, V]
    return model.lm_head(hidden[:, -1]), hidden  # [B, V]
