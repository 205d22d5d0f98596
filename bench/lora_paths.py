"""`python -m bench.lora_paths`: the LoRA work of one decode step when 8 rows hold 8 different
single adapters, per path, interleaved in one process (GPT-2 124M's 36 wrapped projections,
rank 16, fp32, random weights).

Paths:

* `concat` — the engine's path (`MultiLoRAConv1D`): the active slots' factors concatenated
  along the rank axis (cached per active set), two matmuls per layer, gates zero where a row
  does not use an adapter; `concat_one` is the same with all 8 rows on one adapter (the
  baseline of "8 distinct ÷ one"); `concat_restack` re-concatenates every step (what an active
  set seen for the first time costs: rows joining, leaving or reordering).
* `grouped` — per adapter, the rows that use it, `x[rows] A_k B_k`, scattered back
  (`index_add`): LoRA work proportional to each row's own rank, one pair of matmuls per
  distinct adapter.
* `gathered` — Punica's BGMV in plain PyTorch: each row's A and B gathered from a persistent
  `[slots, in, r]` / `[slots, r, out]` buffer by the row's slot index, then two `bmm`.

Prints the median ms per step of each (base projections included, as the engine runs them) and
the ratios; issue 26 kept the path that measured fastest (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.pytorch_utils import Conv1D

from server.engine.lora_layer import LoRABatchContext, MultiLoRAConv1D

SHAPES = [(768, 2304), (768, 768), (3072, 768)]  # c_attn, attn.c_proj, mlp.c_proj


def build(n_layer: int, slots: int, rank: int) -> tuple[list[MultiLoRAConv1D], LoRABatchContext, list[dict]]:
    ctx = LoRABatchContext()
    layers, buffers = [], []
    g = torch.Generator().manual_seed(0)
    for _ in range(n_layer):
        for d_in, d_out in SHAPES:
            conv = Conv1D(d_out, d_in)
            with torch.no_grad():
                conv.weight.normal_(0, 0.02, generator=g)
            layer = MultiLoRAConv1D(conv, slots, ctx)
            a_all = torch.randn(slots, d_in, rank, generator=g) / d_in ** 0.5
            b_all = torch.randn(slots, rank, d_out, generator=g) * 0.01
            for s in range(slots):
                layer.set_slot(s, a_all[s], b_all[s])
            layers.append(layer)
            buffers.append({"A": a_all, "B": b_all})
    return layers, ctx, buffers


def grouped(layer: MultiLoRAConv1D, x2: torch.Tensor, slot_of_row: torch.Tensor, gate: torch.Tensor,
            groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    y = layer._base(x2)
    for slot, rows in groups:
        a, b = layer.lora_a[slot], layer.lora_b[slot]
        assert a is not None and b is not None
        y.index_add_(0, rows, ((x2[rows] @ a) * gate[rows, None]) @ b)
    return y


def gathered(layer: MultiLoRAConv1D, buf: dict, x2: torch.Tensor, slot_of_row: torch.Tensor,
             gate: torch.Tensor) -> torch.Tensor:
    y = layer._base(x2)
    a = buf["A"].index_select(0, slot_of_row)  # [B, in, r]
    b = buf["B"].index_select(0, slot_of_row)  # [B, r, out]
    h = torch.bmm(x2[:, None, :], a) * gate[:, None, None]  # [B, 1, r]
    return y.add_(torch.bmm(h, b)[:, 0])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lora_paths")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    B = args.rows
    layers, ctx, buffers = build(args.layers, B, args.rank)
    xs = [torch.randn(B, 1, layer.in_features) for layer in layers]
    gate = torch.ones(B)
    slot_of_row = torch.arange(B)
    groups = [(s, torch.tensor([s])) for s in range(B)]
    distinct = (tuple(range(B)), torch.eye(B))  # row i on slot i, gate 1
    one = ((0,), torch.ones(B, 1))
    check = torch.allclose(grouped(layers[0], xs[0][:, 0], slot_of_row, gate, groups),
                           _concat(layers[0], ctx, xs[0], *distinct)[:, 0], atol=1e-4) and torch.allclose(
        gathered(layers[0], buffers[0], xs[0][:, 0], slot_of_row, gate),
        _concat(layers[0], ctx, xs[0], *distinct)[:, 0], atol=1e-4)
    paths = {
        "concat": lambda: [_concat(lay, ctx, x, *distinct) for lay, x in zip(layers, xs, strict=True)],
        "concat_one": lambda: [_concat(lay, ctx, x, *one) for lay, x in zip(layers, xs, strict=True)],
        "concat_restack": lambda: [(lay._stacks.clear(), _concat(lay, ctx, x, *distinct))
                                   for lay, x in zip(layers, xs, strict=True)],
        "grouped": lambda: [grouped(lay, x[:, 0], slot_of_row, gate, groups) for lay, x in zip(layers, xs, strict=True)],
        "gathered": lambda: [gathered(lay, buf, x[:, 0], slot_of_row, gate)
                             for lay, buf, x in zip(layers, buffers, xs, strict=True)],
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    for fn in paths.values():
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved
        for name, fn in paths.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append(1000 * (time.perf_counter() - t) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"rows {B}, rank {args.rank}, {len(layers)} projections, {args.threads} threads; same outputs: {check}")
    for k, v in med.items():
        print(f"  {k:15s} {v:7.2f} ms/step   ÷ concat {v / med['concat']:.2f}")
    print(f"  concat (8 distinct) ÷ concat_one: {med['concat'] / med['concat_one']:.2f}")


def _concat(layer: MultiLoRAConv1D, ctx: LoRABatchContext, x: torch.Tensor, active: tuple[int, ...],
            gates: torch.Tensor) -> torch.Tensor:
    with ctx.applied(active, gates):
        return layer(x)


if __name__ == "__main__":
    main()
