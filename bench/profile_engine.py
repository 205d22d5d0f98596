"""Where a decode step goes: `python -m bench.profile_engine`.

A torch.profiler breakdown of the engine's routed decode step (4 adapters, re-route every 2)
and of HF's cached decode step, by category (Conv1D base matmuls, LoRA matmuls, LM head,
attention, KV-cache writes or concatenation, element-wise, the rest; Python = wall − ops).
The candidate changes it was used to measure (fused LoRA addmm, mask-free aligned decode,
batched prefill, a routing pass without the LM head, oneDNN instead of MKL for the base and
LM-head matmuls on CPU) are now part of the engine.

Run it with `--threads 1` on a shared machine: two OpenMP threads on two busy cores turn every
small op into a wait for the other thread, and the figures become noise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import BenchConfig, log, random_prompts, setup_torch
from bench.rig import Assets
from server.engine.quant import QUANTS

CATEGORIES = ("conv1d_base", "lora", "lm_head", "attention", "kv_write", "kv_concat", "elementwise", "other_ops",
              "python")


# the ops a base projection runs as: float (MKL, oneDNN), --quant int8, --quant w8a8
BASE_OPS = ("aten::addmm", "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm", "quantized::linear_dynamic")


def _classify(name: str, shapes: list, vocab: int, rank_cols: set[int]) -> str:
    flat = [d for s in shapes if isinstance(s, list | tuple) for d in s]
    if name in BASE_OPS or name in ("aten::addmm_", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"):
        if vocab in flat:
            return "lm_head"
        if any(d in rank_cols for d in flat):
            return "lora"
        if name in BASE_OPS:
            return "conv1d_base"
        return "other_ops"
    if "scaled_dot_product" in name or name.startswith("aten::_flash") or "attention" in name:
        return "attention"
    if name in ("aten::index_put_", "aten::_index_put_impl_", "aten::copy_", "aten::slice_scatter"):
        return "kv_write"
    if name == "aten::cat":
        return "kv_concat"
    if name in ("aten::add", "aten::mul", "aten::tanh", "aten::pow", "aten::native_layer_norm", "aten::layer_norm",
                "aten::add_", "aten::mul_", "aten::gelu", "aten::div"):
        return "elementwise"
    return "other_ops"


def breakdown(fn, steps: int, vocab: int, rank_cols: set[int]) -> dict:
    """Self CPU time per category over `steps` calls of `fn` (one decode step each)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = time.perf_counter() - start
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for ev in prof.key_averages(group_by_input_shape=True):
        totals[_classify(ev.key, ev.input_shapes or [], vocab, rank_cols)] += ev.self_cpu_time_total / 1e6
    ops = sum(totals.values())
    totals["python"] = max(wall - ops, 0.0)
    total = sum(totals.values())
    return {"ms_per_step": round(1000 * wall / steps, 2),
            "share": {k: round(v / total, 3) for k, v in totals.items() if v > 0},
            "ms": {k: round(1000 * v / steps, 2) for k, v in totals.items() if v > 0}}


def _engine_stepper(rig, batch: int, vocab: int, cfg: BenchConfig):
    """An engine with `batch` routed sequences running; returns a one-decode-step callable."""
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import RoutingSpec, Sequence

    engine = rig.engine
    _shutdown(engine)
    prompts = random_prompts(cfg, batch, vocab, seed=21)
    names = list(rig.routing.resolve("centroid")[1])
    for row in prompts.tolist():
        versions = rig.registry.acquire(names)
        engine.submit(Sequence(prompt_ids=row, max_tokens=10_000, sampling=SamplingParams(temperature=0.0),
                               routing=RoutingSpec("auto", router="centroid", reroute_every=2),
                               decode=lambda t: "", emit=lambda e: None, eos_token_id=None,
                               versions={v.name: v for v in versions}))
    engine.step()  # prefill + first decode
    return engine.step


def _shutdown(engine) -> None:
    with torch.inference_mode():  # the cache tensors were made in inference mode
        engine.shutdown()


def _hf_stepper(model, batch: int, vocab: int, cfg: BenchConfig):
    from transformers import DynamicCache

    ids = random_prompts(cfg, batch, vocab, seed=21)
    state = {"cache": DynamicCache()}
    out = model(input_ids=ids, past_key_values=state["cache"], use_cache=True)
    state["tok"] = out.logits[:, -1:].argmax(-1)

    @torch.inference_mode()
    def step():
        out = model(input_ids=state["tok"], past_key_values=state["cache"], use_cache=True)
        state["tok"] = out.logits[:, -1:].argmax(-1)

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="decode steps per profiler breakdown")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--quant", choices=QUANTS, default="none", help="the engine's --quant")
    args = p.parse_args(argv)
    cfg = BenchConfig.make(tiny=args.tiny, device="cpu", threads=args.threads)
    cfg.new_tokens = args.new_tokens if not args.tiny else cfg.new_tokens
    cfg.batches = tuple(int(b) for b in args.batches.split(","))
    setup_torch(cfg.threads)
    result: dict = {"threads": cfg.threads, "new_tokens": cfg.new_tokens, "quant": args.quant}
    with tempfile.TemporaryDirectory(prefix="switchboard-profile-") as tmp:
        assets = Assets(cfg, Path(tmp))
        rig = assets.engine_rig(quant=args.quant)
        vocab = assets.base.config.vocab_size
        ranks = {v.weights.rank for v in rig.registry.snapshot().values()}
        rank_cols = {r * k for r in ranks for k in range(1, 5)}
        result["profile"] = {}
        for batch in cfg.batches:
            with torch.inference_mode():
                hf = breakdown(_hf_stepper(assets.base, batch, vocab, cfg), args.steps, vocab, rank_cols)
            eng = breakdown(_engine_stepper(rig, batch, vocab, cfg), args.steps, vocab, rank_cols)
            _shutdown(rig.engine)
            result["profile"][f"b{batch}"] = {"hf_step": hf, "engine_routed_step": eng}
            log(f"profile b{batch}: HF {hf['ms_per_step']} ms/step {hf['share']}")
            log(f"profile b{batch}: engine {eng['ms_per_step']} ms/step {eng['share']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("profile", {}), indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

