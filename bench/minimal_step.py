"""How far the kernel alone is from the 16-bit floor: `python -m bench.minimal_step`.

Issue 22 asks for a routed batch-1 step at or under the floor a 16-bit engine would have. This
measures, in one process, three steps of GPT-2 124M (random weights) over a 64-token context:

- `min_fbgemm_only`: the least an eager PyTorch w8a8 step can be here — fbgemm's int8 products,
  layer norms, attention over a static cache, nothing else (no per-row scaling, so it is not
  batch invariant: the kernel's own cost);
- `min_w8a8_rowscaled`: the same through the engine's `W8A8Linear` (per-row scaling, a row's
  numerics its own);
- `min_native_int8`, `min_native_w8a8`: the same bare step through the native kernels
  (`server/kernels/int8_gemv.cpp`: fp32 activations, or activations quantised per row), when
  they build here;
- `engine_routed_w8a8_fbgemm`, `engine_routed_w8a8`, `engine_routed_int8`: the engine's step
  (w8a8 through fbgemm, then through the native kernel, and weight-only int8), routed over 4
  adapters, re-routing every 2 tokens.

Each is printed with its ratio to the floor of the base weights at 16 bits (the bandwidth
measured in the same run). The gap between the first and the floor is the kernel's and eager
PyTorch's; the gap between the second and the third is the engine's (LoRA, routing, sampling,
its Python). Timings only; nothing here is a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench import floor
from bench.common import BenchConfig, gpt2_config, setup_torch
from bench.profile_engine import _engine_stepper, _shutdown
from bench.rig import Assets
from server.engine.quant import _MARKS, Int8Linear, W8A8Linear, _linear_dynamic
from server.kernels import native

Lin = Callable[[Any, torch.Tensor], torch.Tensor]
PROMPT, NEW = 64, 32  # the decode bench's context and steps


def _fbgemm_only(m: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """The kernel alone: the input padded by the packed weight's mark columns, quantised on one scale."""
    return _linear_dynamic(F.pad(x, (0, _MARKS)), m.packed, True)


class MinimalGPT2:
    """GPT-2 124M as a bare decode step: int8 projections and head (`W8A8Linear`s, or `Int8Linear`s
    for `kind` "int8"; through the native kernel when `kernel` is given), a static KV cache."""

    def __init__(self, d: int = 768, layers: int = 12, heads: int = 12, vocab: int = 50257,
                 kernel: native.NativeInt8 | None = None, kind: str = "w8a8") -> None:
        torch.manual_seed(0)
        self.d, self.heads = d, heads

        def lin(o: int, i: int, bias: bool = True) -> Any:
            w, b = torch.randn(o, i) * 0.02, torch.zeros(o) if bias else None
            return Int8Linear(w, b, kernel) if kind == "int8" else W8A8Linear(w, b, kernel)

        self.layers = [{"attn": lin(3 * d, d), "proj": lin(d, d), "fc": lin(4 * d, d), "mproj": lin(d, 4 * d)}
                       for _ in range(layers)]
        self.head = lin(vocab, d, bias=False)
        self.wte, self.wpe = torch.randn(vocab, d) * 0.02, torch.randn(1024, d) * 0.01
        self.ln = (torch.ones(d), torch.zeros(d))

    def decode(self, lin: Lin, batch: int) -> float:
        """ms per step over NEW steps after PROMPT steps have filled the cache."""
        d, H = self.d, self.heads
        hd = d // H
        K = [torch.zeros(batch, H, PROMPT + NEW, hd) for _ in self.layers]
        V = [torch.zeros(batch, H, PROMPT + NEW, hd) for _ in self.layers]
        ids = torch.zeros(batch, dtype=torch.long)
        start = 0.0
        for pos in range(PROMPT + NEW):
            if pos == PROMPT:
                start = time.perf_counter()
            x = self.wte[ids] + self.wpe[pos]  # [B, d]
            for i, layer in enumerate(self.layers):
                q, k, v = lin(layer["attn"], F.layer_norm(x, (d,), *self.ln)).split(d, dim=1)
                K[i][:, :, pos], V[i][:, :, pos] = k.view(batch, H, hd), v.view(batch, H, hd)
                y = F.scaled_dot_product_attention(q.view(batch, H, 1, hd), K[i][:, :, :pos + 1], V[i][:, :, :pos + 1])
                x = x + lin(layer["proj"], y.reshape(batch, d))
                x = x + lin(layer["mproj"], F.gelu(lin(layer["fc"], F.layer_norm(x, (d,), *self.ln)), approximate="tanh"))
            ids = lin(self.head, F.layer_norm(x, (d,), *self.ln)).argmax(-1)
        return (time.perf_counter() - start) / NEW * 1e3


def measure(cfg: BenchConfig, batches: list[int], repeats: int) -> dict[int, dict]:
    """Per batch: the 16-bit floor of the base weights (ms, at the run's best bandwidth) and each
    step's ms per step (median and every repeat), the steps interleaved per repeat."""
    shape = gpt2_config(cfg.tiny)
    dims = (shape.n_embd, shape.n_layer, shape.n_head, shape.vocab_size)
    w8a8 = MinimalGPT2(*dims)
    minimal: dict[str, tuple[MinimalGPT2, Lin]] = {"min_fbgemm_only": (w8a8, _fbgemm_only),
                                                   "min_w8a8_rowscaled": (w8a8, lambda m, x: m(x))}
    kernel = native.load()
    if kernel is not None:
        minimal["min_native_int8"] = (MinimalGPT2(*dims, kernel=kernel, kind="int8"), lambda m, x: m(x))
        minimal["min_native_w8a8"] = (MinimalGPT2(*dims, kernel=kernel), lambda m, x: m(x))
    out: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="switchboard-minimal-") as tmp:
        assets = Assets(cfg, Path(tmp))
        rigs = {"w8a8_fbgemm": assets.engine_rig(quant="w8a8", native=False)}
        if kernel is not None:
            rigs.update({q: assets.engine_rig(quant=q) for q in ("w8a8", "int8")})
        base16 = floor.weight_bytes(assets.base, torch.bfloat16)
        for batch in batches:
            steppers = {f"engine_routed_{q}": _engine_stepper(rig, batch, assets.base.config.vocab_size, cfg)
                        for q, rig in rigs.items()}
            runs: dict[str, list[float]] = {m: [] for m in (*minimal, *steppers)}
            gb_s = 0.0
            for _ in range(repeats):  # interleaved, so a disturbance spreads over all of them
                with torch.inference_mode():
                    for name, (model, lin) in minimal.items():
                        runs[name].append(model.decode(lin, batch))
                for name, engine_step in steppers.items():
                    for _ in range(2):
                        engine_step()
                    start = time.perf_counter()
                    for _ in range(NEW // 2):
                        engine_step()
                    runs[name].append((time.perf_counter() - start) / (NEW // 2) * 1e3)
                bw = floor.measure(torch.device("cpu"), torch.float32, base16, shape.n_embd, tiny=cfg.tiny)
                gb_s = max(gb_s, bw["gb_s"])
            for rig in rigs.values():
                _shutdown(rig.engine)
            out[batch] = {"floor16_ms": floor.floor_ms(base16, gb_s), "gb_s": gb_s,
                          "ms": {m: statistics.median(ms) for m, ms in runs.items()}, "repeats": runs}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.minimal_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tiny", action="store_true", help="the bench's tiny GPT-2 (tests): seconds, numbers meaningless")
    args = p.parse_args(argv)
    cfg = BenchConfig.make(tiny=args.tiny, device="cpu", threads=args.threads)
    setup_torch(cfg.threads)
    for batch, r in measure(cfg, [int(b) for b in args.batches.split(",")], args.repeats).items():
        print(f"batch {batch}: 16-bit floor of the base weights {r['floor16_ms']:.2f} ms ({r['gb_s']} GB/s, best of the run)")
        for name, med in r["ms"].items():
            print(f"  {name:<20} {med:6.2f} ms/step  ÷ floor16 {med / r['floor16_ms']:.2f}  "
                  f"(repeats {', '.join(f'{x:.1f}' for x in r['repeats'][name])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
