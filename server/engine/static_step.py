"""A static-shape decode step, the way gpt-fast (pytorch-labs) reaches the bandwidth floor with plain
PyTorch: one function over tensors of fixed shape, so `torch.compile` can turn the whole step into
one graph (inductor's C++ on CPU, CUDA graphs with `mode="reduce-overhead"` on GPU) and Python
costs nothing per layer.

What makes the shapes fixed:
- the batch is padded to a bucket (a power of two); padded rows decode token 0 at position 0 of
  cache rows no sequence uses, with zero gates, and their outputs are dropped;
- attention reads the cache up to a bucketed length (a power of two ≥ the furthest position) and a
  mask hides each row's future, instead of slicing each row to its own length;
- the LoRA adapters are inputs, not code: every wrapped projection gets an `A [in, R]`, `B [R, out]`
  pair holding the active adapters' factors side by side (zeros where an adapter does not target
  that module, and zero padding up to a bucketed R), and one gate matrix `[B, R]` says how much of
  each rank column each row uses. Re-routing changes the gate values, a hot swap changes the
  factor tensors' values; neither changes a shape or a Python constant, so neither recompiles.

Batch, length and rank are marked dynamic, so one compiled graph serves every bucket (CUDA graphs
record once per bucket). The step computes exactly what `gpt2.forward` computes for a decode step;
the engine still prefills with `gpt2.forward` into the same cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from server.engine import cpu_linear, gpt2
from server.engine.kv_cache import KVCache
from server.engine.lora_layer import LoRABatchContext, MultiLoRAConv1D, gated
from server.engine.slots import SlotManager

log = logging.getLogger(__name__)

MIN_RANK_BUCKET = 16
MIN_LENGTH_BUCKET = 64


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two ≥ max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


@dataclass
class Projection:
    """One wrapped Conv1D as the step uses it: the Conv1D's own weight parameter `[in, out]` (the
    step computes `addmm(bias, x, weight)`, what Conv1D computes), the `[out, in]` copy oneDNN
    wants for the eager CPU step (None elsewhere), its bias, and the wrapper that holds the
    adapter slots. The step reads the parameter itself, not a `.t()` of it made here: under CUDA
    graphs every tensor that is neither a per-step input nor a static address is copied into the
    graph's own buffer on every replay (all 48 projection weights, ~170 MB a step in fp16)."""

    weight: torch.Tensor  # [in, out], the Conv1D's parameter
    weight_t: torch.Tensor | None  # [out, in] for oneDNN (CPU), sharing the parameter's storage
    bias: torch.Tensor  # [out]
    wrapper: MultiLoRAConv1D

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in)."""
        return int(self.weight.shape[1]), int(self.weight.shape[0])


def _projection(module: Any) -> Projection:
    assert isinstance(module, MultiLoRAConv1D), "wrap the model's targets before building the step"
    base: Any = module.base
    return Projection(base.weight, module.weight_t, base.bias, module)


@dataclass
class Stack:
    """The active slots' factors for every projection, side by side: `a`/`b` hold all of them
    (zeros where no active adapter targets a projection: the compiled step's fixed layout),
    `sparse_a`/`sparse_b` None there (the eager step skips those matmuls); `cols` [R] gives the
    position in the active tuple of each rank column (len(active) for padding)."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    sparse_a: list[torch.Tensor | None]
    sparse_b: list[torch.Tensor | None]
    cols: torch.Tensor


@dataclass
class Layer:
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    attn: Projection
    attn_proj: Projection
    fc: Projection
    mlp_proj: Projection

    def projections(self) -> tuple[Projection, ...]:
        return self.attn, self.attn_proj, self.fc, self.mlp_proj


def _dynamic(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Tell torch.compile these sizes vary (batch, length, rank, cache capacity), so a new bucket
    reuses the graph instead of compiling another (sizes of 1 still get their own graph)."""
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(t, dim)
    return t


class StaticDecoder:
    """The decode step over fixed-shape inputs, compiled or not; built by the engine when
    `--compile` is on, beside `gpt2.forward` (which still serves prefill)."""

    max_cached_stacks = 8

    def __init__(self, model: GPT2LMHeadModel, cache: KVCache, slots: SlotManager, ctx: LoRABatchContext,
                 compile: bool = False, backend: str | Callable = "inductor", mode: str | None = None,
                 static_addresses: bool | None = None) -> None:
        tr: Any = model.transformer
        cfg = model.config
        self.model, self.cache, self.slots, self.ctx = model, cache, slots, ctx
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.eps = cfg.layer_norm_epsilon
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias)
        self.scale = tr.h[0].attn.scaling
        tanh_gelu = cfg.activation_function in gpt2.TANH_GELU
        self.act: Callable[[torch.Tensor], torch.Tensor] = (
            (lambda t: F.gelu(t, approximate="tanh")) if tanh_gelu else tr.h[0].mlp.act)
        self.layers = [Layer((b.ln_1.weight, b.ln_1.bias), (b.ln_2.weight, b.ln_2.bias), _projection(b.attn.c_attn),
                             _projection(b.attn.c_proj), _projection(b.mlp.c_fc), _projection(b.mlp.c_proj))
                       for b in tr.h]
        self.projections = [p for layer in self.layers for p in layer.projections()]
        # Eager: oneDNN's linear on CPU (MKL's addmm repacks the weight on every call, see
        # `cpu_linear`), decided once here. Compiled: F.linear, which inductor lowers itself (its
        # lowering of the oneDNN op wants frozen weights).
        self.onednn = not compile and cpu_linear.onednn_available(self.wte.device, self.wte.dtype) and all(
            p.weight_t is not None and p.weight_t.is_contiguous() for p in self.projections) and self.wte.is_contiguous()
        self._stacks: OrderedDict[tuple, Stack] = OrderedDict()
        self._zero: dict[int, tuple[list[torch.Tensor | None], list[torch.Tensor | None]]] = {}
        self.compiled = compile
        self.graphs = compile and mode == "reduce-overhead"
        # Static addresses (on with CUDA graphs; a test turns them on for CPU): every tensor the
        # step reads that is not a per-step input keeps its address, and torch.compile is told
        # so, so CUDA graphs read it in place instead of copying it in on every replay.
        self.static_addresses = self.graphs if static_addresses is None else static_addresses
        if self.static_addresses:
            for t in self.static_tensors():
                torch._dynamo.mark_static_address(t)
        self.calls = 0
        self.thread: int | None = None  # the thread that warmed the step up (CUDA graph trees are per thread)
        self._step: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._forward
        if compile:
            self._step = torch.compile(self._forward, backend=backend, mode=mode)

    def static_tensors(self) -> list[torch.Tensor]:
        """The weights the step reads (embeddings, norms, projection weights and biases); the KV
        cache is the other static address (`_cache_tensors`)."""
        out = [self.wte, self.wpe, *self.ln_f]
        for layer in self.layers:
            out += [*layer.ln1, *layer.ln2]
            for p in layer.projections():
                out += [p.weight, p.bias]
        return out

    # -- the step itself (what torch.compile sees) ------------------------------------------------------------
    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [N, in] @ weight[out, in].T + bias (the tied LM head)."""
        if self.onednn:
            return cpu_linear.linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def _base(self, x: torch.Tensor, p: Projection) -> torch.Tensor:
        """The Conv1D's x [N, in] @ W [in, out] + b."""
        if self.onednn and p.weight_t is not None:
            return cpu_linear.linear(x, p.weight_t, p.bias)
        return torch.addmm(p.bias, x, p.weight)

    def _lora_linear(self, x: torch.Tensor, p: Projection, a: torch.Tensor | None, b: torch.Tensor | None,
                     gates: torch.Tensor) -> torch.Tensor:
        """base(x) + ((x A) · gates) B for x [B, in], with `a` [in, R], `b` [R, out], `gates` [B, R];
        `a` is None (eager step only) where no active adapter targets this projection. The gated
        product is exactly 0 where a gate is 0 (`lora_layer.gated`): one adapter's `x A` that
        overflows fp16 would otherwise make inf x 0 = NaN in every row that does not use it."""
        y = self._base(x, p)
        if a is None or b is None:
            return y
        return y.addmm(gated(torch.mm(x, a), gates, 1), b)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, keys: list[torch.Tensor],
                 values: list[torch.Tensor], gates: torch.Tensor, lora_a: list[torch.Tensor | None],
                 lora_b: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, pos [B]; mask [B, 1, 1, L] (True = visible); keys/values per layer [Bcap, H, Pcap, hd];
        gates [B, R]; lora_a/lora_b per projection [in, R] / [R, out]. Returns logits [B, V] and the
        final hidden states [B, d]."""
        B, L = ids.shape[0], mask.shape[-1]
        H, d = self.n_head, self.n_embd
        hd = d // H
        rows = torch.arange(B, device=ids.device)
        x = self.wte[ids] + self.wpe[pos]  # [B, d]
        j = 0
        for layer, ck, cv in zip(self.layers, keys, values, strict=True):
            h = F.layer_norm(x, (d,), *layer.ln1, self.eps)
            qkv = self._lora_linear(h, layer.attn, lora_a[j], lora_b[j], gates)  # [B, 3d]
            q, k, v = qkv.view(B, 3, H, hd).unbind(1)  # each [B, H, hd]
            ck[rows, :, pos] = k
            cv[rows, :, pos] = v
            y = F.scaled_dot_product_attention(q[:, :, None], ck[:B, :, :L], cv[:B, :, :L], attn_mask=mask,
                                               scale=self.scale)  # [B, H, 1, hd]
            x = x + self._lora_linear(y.reshape(B, d), layer.attn_proj, lora_a[j + 1], lora_b[j + 1], gates)
            h = F.layer_norm(x, (d,), *layer.ln2, self.eps)
            h = self.act(self._lora_linear(h, layer.fc, lora_a[j + 2], lora_b[j + 2], gates))
            x = x + self._lora_linear(h, layer.mlp_proj, lora_a[j + 3], lora_b[j + 3], gates)
            j += 4
        hidden = F.layer_norm(x, (d,), *self.ln_f, self.eps)  # [B, d]
        return self._linear(hidden, self.wte, None), hidden

    # -- fixed-shape inputs -----------------------------------------------------------------------------------
    def _stack(self, active: tuple[int, ...]) -> Stack:
        """Every projection's factors for the active slots side by side, in one layout shared by all
        projections: `cols[r]` is the position in `active` of rank column r (len(active) = padding).
        Cached per (active slots, what is installed in them)."""
        key = tuple((s, self.slots.epoch[s]) for s in active)
        hit = self._stacks.get(key)
        if hit is not None:
            self._stacks.move_to_end(key)
            return hit
        ranks = [self.slots.rank_of(s) for s in active]
        R = bucket(sum(ranks), MIN_RANK_BUCKET)
        first = self.wte
        cols = torch.full((R,), len(active), dtype=torch.long, device=first.device)
        offsets = []
        at = 0
        for i, r in enumerate(ranks):
            cols[at:at + r] = i
            offsets.append(at)
            at += r
        a_all, b_all, sparse_a, sparse_b = [], [], [], []
        for p in self.projections:
            out_f, in_f = p.shape
            a = torch.zeros(in_f, R, dtype=first.dtype, device=first.device)
            b = torch.zeros(R, out_f, dtype=first.dtype, device=first.device)
            used = False
            for slot, at, r in zip(active, offsets, ranks, strict=True):
                fa, fb = p.wrapper.lora_a[slot], p.wrapper.lora_b[slot]
                if fa is not None and fb is not None:
                    a[:, at:at + r] = fa
                    b[at:at + r] = fb
                    used = True
            a_all.append(a)
            b_all.append(b)
            sparse_a.append(a if used else None)
            sparse_b.append(b if used else None)
        if len(self._stacks) >= self.max_cached_stacks:
            self._stacks.popitem(last=False)
        stack = Stack(a_all, b_all, sparse_a, sparse_b, cols)
        self._stacks[key] = stack
        return stack

    def _no_adapters(self, R: int = MIN_RANK_BUCKET) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        if R not in self._zero:
            first = self.wte
            self._zero[R] = ([torch.zeros(p.shape[1], R, dtype=first.dtype, device=first.device)
                              for p in self.projections],
                             [torch.zeros(R, p.shape[0], dtype=first.dtype, device=first.device)
                              for p in self.projections])
        return self._zero[R]

    def inputs(self, ids: torch.Tensor, pos: torch.Tensor, top: int, rank: int = MIN_RANK_BUCKET) -> dict[str, Any]:
        """The step's arguments for cache rows 0..n-1 decoding `ids` [n, 1] at positions `pos` [n, 1]
        (`top`: the largest of them, known on the host, so reading it costs no device sync), padded
        to the batch bucket, with the gates the engine set in the shared LoRA context (`rank`: the
        width of the zero factors when no adapter is active; the warm-up varies it)."""
        n = ids.shape[0]
        Bb = bucket(n)
        cap_rows, cap_pos = self.cache.capacity
        assert cap_rows >= Bb, "reserve the cache rows for the batch bucket first"
        dev, dtype = self.wte.device, self.wte.dtype
        L = min(bucket(top + 1, MIN_LENGTH_BUCKET), cap_pos)
        ids_t = torch.zeros(Bb, dtype=torch.long, device=dev)
        pos_t = torch.zeros(Bb, dtype=torch.long, device=dev)
        ids_t[:n] = ids[:, 0]
        pos_t[:n] = pos[:, 0]
        mask = torch.arange(L, device=dev)[None, :] <= pos_t[:, None]  # [Bb, L]
        ctx = self.ctx
        a: list[torch.Tensor | None]
        b: list[torch.Tensor | None]
        if ctx.active and ctx.gates is not None:
            stack = self._stack(ctx.active)
            cols = stack.cols
            # compiled: every projection gets factors (zeros where unused), so which modules the
            # adapters target never changes the graph; eager: skip the unused ones
            full_a: list[torch.Tensor | None] = [*stack.a]
            full_b: list[torch.Tensor | None] = [*stack.b]
            a, b = (full_a, full_b) if self.compiled else (stack.sparse_a, stack.sparse_b)
            g = ctx.gates.to(dev, dtype)
            g = torch.cat([g, g.new_zeros(g.shape[0], 1)], dim=1)[:, cols]  # [n, R]
            gates = torch.zeros(Bb, cols.shape[0], dtype=dtype, device=dev)
            gates[:n] = g
        else:
            none: list[torch.Tensor | None] = [None] * len(self.projections)
            a, b = self._no_adapters(rank) if self.compiled else (none, none)
            gates = torch.zeros(Bb, rank, dtype=dtype, device=dev)
        if self.compiled:
            for t in (*self.cache.keys, *self.cache.values):
                _dynamic(t, 0, 2)  # [Bcap, H, Pcap, hd]
                if self.static_addresses and not hasattr(t, "_dynamo_static_input_type"):
                    # CUDA graphs write the cache in place, never copy it in; allocated to capacity
                    # up front on CUDA (`KVCache(full=True)`), so it never moves under a graph.
                    # Guarded: were it to move anyway, the step recompiles instead of replaying
                    # a graph that reads the old address (unguarded is torch's default).
                    torch._dynamo.mark_static_address(t, guard=True)
            for fa, fb in zip(a, b, strict=True):
                if fa is not None and fb is not None:
                    _dynamic(fa, 1)  # [in, R]
                    _dynamic(fb, 0)  # [R, out]
        return {"ids": _dynamic(ids_t, 0), "pos": _dynamic(pos_t, 0), "mask": _dynamic(mask[:, None, None, :], 0, 3),
                "keys": self.cache.keys, "values": self.cache.values, "gates": _dynamic(gates, 0, 1),
                "lora_a": a, "lora_b": b}

    def step(self, ids: torch.Tensor, pos: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for cache rows 0..n-1 (`ids`, `pos` [n, 1]; `top`: max of `pos`, from
        the host, the engine's `Sequence.position`): logits [n, V] and hidden states [n, 1, d], as
        `gpt2.forward` returns them."""
        n = ids.shape[0]
        if self.graphs and self.thread is not None and threading.get_ident() != self.thread:
            raise RuntimeError("the CUDA-graph decode step runs on another thread than its warm-up "
                               "(CUDA graph trees are per thread): warm up on the engine thread")
        top = int(pos.max()) if top is None else top
        self.cache.reserve(bucket(n), top + 1)
        logits, hidden = self._step(**self.inputs(ids, pos, top))
        self.calls += 1
        if self.graphs:  # CUDA graphs overwrite their outputs on the next replay; the engine keeps hidden states
            return logits[:n].clone(), hidden[:n, None].clone()
        return logits[:n], hidden[:n, None]

    def warm_up(self, batch_sizes: list[int]) -> float:
        """Run (and so compile) the step for each batch bucket up to the largest given, with zero
        factors at two rank buckets, before the server says it is ready; returns the seconds it
        took. Writes only cache rows no sequence holds yet (the engine warms up before admitting any)."""
        start = time.perf_counter()
        # Inductor guards a graph on sizes it saw while lowering: the batch-1 graph compiled at
        # rank 16 kept `R <= 16`, one compiled at 32 keeps `R >= 17`, and the first mixture on the
        # other side compiled mid-serving. So each batch bucket is compiled at both rank buckets.
        # (The attended length never equals the cache tensors' length: see `KVCache._alloc`.)
        ranks = (MIN_RANK_BUCKET, 2 * MIN_RANK_BUCKET) if self.compiled else (MIN_RANK_BUCKET,)
        self.thread = threading.get_ident()
        with torch.inference_mode(), self.ctx.applied():  # no adapters; whatever was set comes back after
            for n in sorted({bucket(b) for b in batch_sizes}):
                zeros = torch.zeros(n, 1, dtype=torch.long, device=self.wte.device)
                self.cache.reserve(n, 1)
                for rank in ranks:
                    self._step(**self.inputs(zeros, zeros, 0, rank))
        seconds = time.perf_counter() - start
        log.info("decode step %s for batch buckets %s in %.1f s", "compiled" if self.compiled else "warmed up",
                 sorted({bucket(b) for b in batch_sizes}), seconds)
        return seconds


def build(model: GPT2LMHeadModel, cache: KVCache, slots: SlotManager, ctx: LoRABatchContext,
          compiled: bool) -> StaticDecoder:
    """The engine's static step: compiled with inductor (C++ on CPU) and, on CUDA, CUDA graphs
    (`mode="reduce-overhead"`, as gpt-fast compiles its decode step)."""
    mode = "reduce-overhead" if compiled and cache.device.type == "cuda" else None
    return StaticDecoder(model, cache, slots, ctx, compile=compiled, mode=mode)


def decode_step(setting: str, device: torch.device) -> str:
    """The engine's `decode_step` for the `--compile` setting. `auto` compiles on CUDA and keeps
    the eager step on CPU. CPU: the compiled step measured 0.96-0.98x the eager one on an idle
    machine (docs/performance.md). CUDA: a GPT-2 decode step at small batch is launch-bound
    eagerly (~30 kernel launches per layer and host syncs per forward), which CUDA graphs
    remove, as in gpt-fast; not yet measured on this project's code (no GPU has run it), so
    `scripts/gpu_check.sh` times both and reports whether this choice holds, and a warm-up that
    fails under `auto` falls back to the eager step (`Engine.warm_up(fallback=True)`)."""
    if setting == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return "compiled" if setting == "on" else "eager"
