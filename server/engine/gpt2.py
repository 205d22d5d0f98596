"""GPT-2's forward pass over the engine's KV cache, calling the HF model's own modules.

The weights (and the LoRA wrappers around the Conv1D projections) stay in the HF
`GPT2LMHeadModel`; this function only replaces the attention's cache handling, so one call
serves both a prefill (rows of right-padded prompts) and a batched decode step (B rows, one
token each, every row at its own position).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

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


Op = Callable[[torch.Tensor], torch.Tensor]


class Block(NamedTuple):
    """One transformer block's parts as `forward` calls them.

    Why: a decode step at batch 1 is ~40 % Python on CPU, and reading them off the modules cost
    ~10 `nn.Module.__getattr__` (a Python function each) and 7 `nn.Module.__call__` (hook checks)
    per block, every step. Read once per model (`blocks`); the projections are the modules' bound
    `forward`s (the engine's models have no hooks), so what a wrapper does at call time (its
    gates, its `--quant` copy) is still read then."""

    ln_1: tuple[torch.Tensor, torch.Tensor, float]  # LayerNorm weight, bias, eps
    c_attn: Op  # [N, T, d] -> [N, T, 3d]
    attn_proj: Op  # [N, T, d] -> [N, T, d]
    ln_2: tuple[torch.Tensor, torch.Tensor, float]
    c_fc: Op  # [N, T, d] -> [N, T, 4d]
    act: Op
    mlp_proj: Op  # [N, T, 4d] -> [N, T, d]
    scaling: float  # the attention's 1/sqrt(head dim) (or HF's variant of it)


_BLOCKS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Block, ...]] = weakref.WeakKeyDictionary()


def blocks(model: GPT2LMHeadModel) -> tuple[Block, ...]:
    """The model's blocks as `Block`s, built on first use. Whoever replaces a module of the model
    after that (`lora_layer.wrap_targets`) calls `forget`."""
    hit = _BLOCKS.get(model)
    if hit is None:
        act = model.config.activation_function
        hit = _BLOCKS[model] = tuple(_block(b, act) for b in model.transformer.h)
    return hit


def forget(model: torch.nn.Module) -> None:
    """Drop `model`'s cached `blocks` (its modules were replaced)."""
    _BLOCKS.pop(model, None)


def _block(b: Any, activation: str) -> Block:
    act = functools.partial(F.gelu, approximate="tanh") if activation in TANH_GELU else b.mlp.act
    return Block((b.ln_1.weight, b.ln_1.bias, b.ln_1.eps), b.attn.c_attn.forward, b.attn.c_proj.forward,
                 (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps), b.mlp.c_fc.forward, act, b.mlp.c_proj.forward,
                 float(b.attn.scaling))


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
    d = cfg.n_embd  # read once: a config attribute costs ~1 µs a read
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
    shape = (d,)
    for layer, blk in enumerate(blocks(model)):
        h = torch.layer_norm(x, shape, *blk.ln_1)
        q, k, v = blk.c_attn(h).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, hd]
        ck, cv = cache.keys[layer], cache.values[layer]  # [Bcap, H, Tcap, hd]
        if row_idx is not None:  # decode, rows at different positions
            ck[row_idx, :, first] = k[:, :, 0]
            cv[row_idx, :, first] = v[:, :, 0]
        else:
            ck[rows, :, start:start + T] = k
            cv[rows, :, start:start + T] = v
        if fresh_prefill:  # plain causal attention over the prompts themselves, no mask or cache read
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=blk.scaling)
        else:  # mask is None when all rows decode at one position: every cached key is visible
            y = F.scaled_dot_product_attention(q, ck[rows, :, :L], cv[rows, :, :L], attn_mask=mask,
                                               scale=blk.scaling)
        y = y.transpose(1, 2).reshape(B, T, d)  # [B, T, d]
        x = x + blk.attn_proj(y)
        x = x + blk.mlp_proj(blk.act(blk.c_fc(torch.layer_norm(x, shape, *blk.ln_2))))
    hidden = tr.ln_f(x)  # [B, T, d]
    if not logits:
        return None, hidden
    if all_logits:
        return lm_head(model, hidden), hidden  # [B, T, V]
    final = hidden[:, -1] if last is None else hidden[torch.arange(B, device=dev), last]  # [B, d]
    return lm_head(model, final), hidden  # [B, V]
