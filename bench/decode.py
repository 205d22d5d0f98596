"""Decode speed: plain HF `generate`, PEFT (one adapter, a mixed batch, a mixture re-merged every
2 tokens) and the Switchboard engine (fixed adapter, routed over 4 adapters re-routing every 2).

All methods decode the same random prompts greedily, prompt 64 + N new tokens, at batch 1 and 8.
The methods run round-robin, `repeats` times, and the median repeat of each counts, reported with
the spread of all repeats: on a shared machine interleaving spreads any slowdown over all methods.

HF `generate` runs in every dtype this device computes well (fp32 and bf16 on CPU) and the faster
one is the baseline, so "× HF" is against the best HF a user would run. Each method's ms/step is
also divided by the memory-bandwidth floor of its step (`bench.floor`), measured in the same run.
"""

from __future__ import annotations

import time

import torch

from bench.common import (
    N_ROUTED,
    REROUTE_EVERY,
    BenchConfig,
    clone,
    decode_stats,
    log,
    median_run,
    random_prompts,
    route_window,
    sync,
)
from bench.rig import EngineRig, engine_generate

METHODS = ("hf_generate", "peft_single", "peft_mixed4", "peft_remerge", "engine_fixed", "engine_routed_once",
           "engine_routed", "engine_routed_int8", "engine_routed_w8a8")
QUANT_METHODS = {"engine_routed_int8": "int8", "engine_routed_w8a8": "w8a8"}  # method -> --quant
LABELS = {
    "hf_generate": "HF generate (no adapter), its faster dtype",
    "peft_single": "PEFT, 1 adapter unmerged",
    "peft_mixed4": "PEFT, 4 adapters mixed batch (adapter_names)",
    "peft_remerge": "PEFT, mixture re-merged every 2 tokens (add_weighted_adapter cat)",
    "engine_fixed": "Switchboard engine, fixed adapter",
    "engine_routed_once": "Switchboard engine, routed over 4, routed once on the prompt",
    "engine_routed": "Switchboard engine, routed over 4, re-route every 2",
    "engine_routed_int8": "the same, --quant int8 (int8 base weights, float LoRA)",
    "engine_routed_w8a8": "the same, --quant w8a8 (int8 base weights and activations, float LoRA)",
    "engine_routed_static": "the same, static-shape decode step run eagerly (--compile runs)",
    "engine_routed_compiled": "the same, static-shape decode step through torch.compile (--compile runs)",
}
STEP_KINDS = {"engine_routed_static": "static", "engine_routed_compiled": "compiled"}


def adapter_names() -> list[str]:
    return [f"a{i}" for i in range(N_ROUTED)]


def adapters_read(method: str, batch: int) -> int:
    """Adapters (of the bench's rank) whose factors one decode step of `method` reads."""
    if method == "hf_generate":
        return 0
    if method in ("peft_single", "engine_fixed"):
        return 1
    if method == "peft_mixed4":
        return min(N_ROUTED, batch)
    if method == "peft_remerge":
        return N_ROUTED * batch  # one merged (cat) adapter per row, each as large as the 4 together
    return N_ROUTED  # the routed engine: the 4 adapters' factors, once for the whole batch


def hf_dtypes(cfg: BenchConfig) -> list[torch.dtype]:
    """The dtypes HF generate is measured in: the bench's, plus fp32/bf16 on CPU (whichever is
    not already it), since which is faster depends on the CPU. bf16 only where the CPU computes
    it (`cpu_linear.native_bf16`): emulated bf16 is several times slower than fp32 (0.5 against
    4.6 tok/s at batch 1 on an AVX2-only CPU), can never be the baseline, and took most of a
    `--quick` run's time there."""
    from server.engine import cpu_linear

    dtypes = [cfg.dtype]
    if cfg.device == "cpu":
        wanted = (torch.float32, torch.bfloat16) if cpu_linear.native_bf16() else (torch.float32,)
        dtypes += [d for d in wanted if d != cfg.dtype]
    return dtypes


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- HF / PEFT generate --------------------------------------------------------------------------------
def _generate(model, prompts: torch.Tensor, new_tokens: int, cfg: BenchConfig, **kwargs) -> tuple[float, float]:
    """Seconds for `generate` of `new_tokens` tokens, and seconds to its first token: `generate`
    asks its stopping criteria after every token it picks, so the first call marks the TTFT (one
    run gives both; a separate 1-token run cost a prefill per method per repeat)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    ids = prompts.to(cfg.device)
    marks: list[float] = []

    class FirstToken(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            if not marks:
                sync(cfg)
                marks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    sync(cfg)
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                   stopping_criteria=StoppingCriteriaList([FirstToken()]), **kwargs)
    sync(cfg)
    end = time.perf_counter()
    return end - start, marks[0] - start


def run_generate(model, prompts, cfg: BenchConfig, **kwargs) -> dict:
    """One timed `generate` of N tokens; its first token's time is the TTFT."""
    n = cfg.new_tokens
    seconds, first = _generate(model, prompts, n, cfg, **kwargs)
    return decode_stats(prompts.shape[0], n, seconds, first, first)


# -- PEFT re-merge loop ------------------------------------------------------------------------------
class RemergeLoop:
    """What a user would write to get a per-token routed mixture on PEFT (the arXiv 2311.10847 method).

    Every 2 tokens: route each row from its last hidden states (mean-pooled, the same centroid
    router the engine uses), merge a new adapter per row with `add_weighted_adapter(cat)`, make
    it active (batch 1) or pass the per-row names (`adapter_names`), delete the previous ones,
    and decode the next 2 tokens with HF's KV cache.
    """

    def __init__(self, peft_model, router, window: int) -> None:
        self.model, self.router, self.window = peft_model, router, window
        self.counter = 0
        self.merges = 0
        self.merge_seconds = 0.0

    def _merge(self, weights: torch.Tensor, previous: list[str]) -> list[str]:
        start = time.perf_counter()
        names = []
        for row in weights.tolist():  # one merged adapter per row
            self.counter += 1
            name = f"mix{self.counter}"
            self.model.add_weighted_adapter(adapter_names(), row, name, combination_type="cat")
            names.append(name)
        self.model.set_adapter(names[0])
        for old in previous:
            self.model.delete_adapter(old)
        self.merges += len(names)
        self.merge_seconds += time.perf_counter() - start
        return names

    def _route(self, tail: torch.Tensor) -> torch.Tensor:
        from router_core.embedders import pool_hidden

        return self.router.route(pool_hidden(tail.float()))  # [B, n]

    def run(self, prompts: torch.Tensor, new_tokens: int, measure: int, cfg: BenchConfig) -> dict:
        """Decode `measure` tokens (≤ `new_tokens`); beyond that, extrapolate the per-token cost."""
        from transformers import DynamicCache

        from router_core.policy import reroute_due

        model = self.model
        ids = prompts.to(cfg.device)
        batch = ids.shape[0]
        measure = max(2, min(measure, new_tokens))
        sync(cfg)
        start = time.perf_counter()
        # Route on the prompt with the base model (adapters off), as the engine does.
        with model.disable_adapter():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]  # [B, T, d]
        names = self._merge(self._route(hidden[:, -self.window:]), [])
        cache = DynamicCache()
        extra = {"adapter_names": names} if batch > 1 else {}
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=True, **extra)
        tail = out.hidden_states[-1][:, -self.window:]  # [B, W, d]
        token = out.logits[:, -1:].argmax(-1)  # [B, 1]
        sync(cfg)
        first = time.perf_counter() - start
        for i in range(1, measure):
            if reroute_due(i, REROUTE_EVERY):  # the engine's cadence
                names = self._merge(self._route(tail), names)
                extra = {"adapter_names": names} if batch > 1 else {}
            out = model(input_ids=token, past_key_values=cache, use_cache=True, output_hidden_states=True, **extra)
            tail = torch.cat([tail, out.hidden_states[-1]], dim=1)[:, -self.window:]
            token = out.logits[:, -1:].argmax(-1)
        sync(cfg)
        measured = time.perf_counter() - start
        model.set_adapter(adapter_names()[0])
        for name in names:
            model.delete_adapter(name)
        per_step = (measured - first) / (measure - 1)
        seconds = first + per_step * (new_tokens - 1)
        stats = decode_stats(batch, new_tokens, seconds, first, first)
        stats.update(measured_tokens=measure, extrapolated=measure < new_tokens, merges=self.merges,
                     merge_ms_per_call=round(1000 * self.merge_seconds / max(self.merges, 1), 2))
        self.merges, self.merge_seconds = 0, 0.0
        return stats


# -- the engine ---------------------------------------------------------------------------------------------
def run_engine(rig: EngineRig, prompts, cfg: BenchConfig, routed: bool, reroute_every: int = REROUTE_EVERY) -> dict:
    from server.engine.sequence import RoutingSpec

    if routed:
        spec = RoutingSpec("auto", router="centroid", reroute_every=reroute_every)
    else:
        spec = RoutingSpec("fixed", {adapter_names()[0]: 1.0})
    sync(cfg)
    r = engine_generate(rig, prompts, cfg.new_tokens, [spec] * prompts.shape[0])
    stats = decode_stats(prompts.shape[0], cfg.new_tokens, r["seconds"], r["ttft"], r["all_first"])
    stats["reroutes"] = r["reroutes"]
    return stats


# -- the section ----------------------------------------------------------------------------------------------
def run(cfg: BenchConfig, assets) -> dict:
    from bench import floor
    from router_core.centroid import CentroidRouter

    hf_models = {f"hf_{_dtype_name(d)}": assets.base if d == cfg.dtype else clone(assets.base).to(d)
                 for d in hf_dtypes(cfg)}
    peft_model = assets.peft()
    rig = assets.engine_rig()
    quant_rigs = {m: assets.engine_rig(quant=q) for m, q in QUANT_METHODS.items()}
    names = adapter_names()
    vocab = assets.base.config.vocab_size
    router = CentroidRouter(names, [rig.registry.get(n).weights.centroids for n in names],
                            temperature=rig.routing.settings.route_temperature or 1.0,
                            top_boost=rig.routing.settings.top_boost)
    remerge = RemergeLoop(peft_model, router, route_window(rig.routing.settings))
    measured = [*hf_models, *METHODS[1:]]
    rigs = {m: assets.engine_rig(kind) for m, kind in STEP_KINDS.items() if cfg.compile}
    measured += list(rigs)

    def methods(prompts):
        batch = prompts.shape[0]
        mixed = [names[i % len(names)] for i in range(batch)]
        fns = {name: (lambda m=model: run_generate(m, prompts, cfg)) for name, model in hf_models.items()}
        return {
            **fns,
            "peft_single": lambda: run_generate(peft_model, prompts, cfg),
            "peft_mixed4": lambda: run_generate(peft_model, prompts, cfg, adapter_names=mixed),
            "peft_remerge": lambda: remerge.run(prompts, cfg.new_tokens, cfg.remerge_tokens, cfg),
            "engine_fixed": lambda: run_engine(rig, prompts, cfg, routed=False),
            "engine_routed_once": lambda: run_engine(rig, prompts, cfg, routed=True, reroute_every=0),
            "engine_routed": lambda: run_engine(rig, prompts, cfg, routed=True),
            **{m: (lambda r=r: run_engine(r, prompts, cfg, routed=True)) for m, r in {**quant_rigs, **rigs}.items()},
        }

    # Warm up every path once (lazy initialisation, allocator, stacked LoRA factors).
    prompts = random_prompts(cfg, 2, vocab, seed=99)
    saved = cfg.new_tokens, cfg.remerge_tokens
    cfg.new_tokens, cfg.remerge_tokens = 3, 3
    for fn in methods(prompts).values():
        fn()
    cfg.new_tokens, cfg.remerge_tokens = saved

    dev = torch.device(cfg.device)
    weights = floor.weight_bytes(assets.base, cfg.dtype)
    bandwidths: list[dict] = []

    def measure_bandwidth() -> None:
        """Once before the repeats and after each round: the best of them is the least disturbed
        by whatever else the machine runs (an estimate taken under load makes the floor too easy)."""
        bw = floor.measure(dev, cfg.dtype, weights, assets.base.config.n_embd, tiny=cfg.tiny)
        bandwidths.append(bw)
        log(f"memory bandwidth {bw['gb_s']} GB/s (copy {bw['copy_gb_s']}, one-row linear {bw['matvec_gb_s']})")

    measure_bandwidth()
    graphs = _compiled_graphs()
    one_adapter = floor.lora_bytes(rig.registry.get(names[0]).weights.tensors, cfg.dtype)

    rank = rig.registry.get(names[0]).weights.rank
    out: dict = {"methods": dict(LABELS), "adapter_rank": rank, "adapters": N_ROUTED,
                 "reroute_every": REROUTE_EVERY, "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
                 "repeats": cfg.repeats, "dtype": _dtype_name(cfg.dtype),
                 "step_warm_up_s": {m: round(r.warm_up_s, 1) for m, r in rigs.items()}}
    for batch in cfg.batches:
        prompts = random_prompts(cfg, batch, vocab, seed=batch)
        fns = methods(prompts)
        runs: dict[str, list[dict]] = {m: [] for m in measured}
        for rep in range(cfg.repeats):
            for m in measured:
                if m == "peft_remerge" and rep > 0 and not cfg.tiny:
                    continue  # slow, and only a contrast: one run
                runs[m].append(fns[m]())
            log(f"decode b{batch} repeat {rep + 1}/{cfg.repeats}: " + ", ".join(
                f"{m} {runs[m][-1]['tok_s']:.1f} tok/s" for m in measured if runs[m]))
            measure_bandwidth()
        block = {m: median_run(runs[m]) for m in measured}
        hf = {m: block.pop(m) for m in hf_models}
        fastest = min(hf, key=lambda m: hf[m]["seconds"])
        block = {"hf_generate": {**hf[fastest], "dtype": fastest.removeprefix("hf_")}, **block}
        block["hf_variants"] = {m.removeprefix("hf_"): x for m, x in hf.items()}
        # ratios within each interleaved repeat: how much one figure moves between repeats
        block["routed_vs_hf_per_repeat"] = [round(r["tok_s"] / h["tok_s"], 3) for r, h in
                                            zip(runs["engine_routed"], runs[fastest], strict=True)]
        out[f"b{batch}"] = block
    if rigs:  # the target: re-routing and new batch sizes never recompile once warmed up
        out["recompiles_after_warm_up"] = _compiled_graphs() - graphs
    bandwidth = max(bandwidths, key=lambda bw: bw["gb_s"])
    out["bandwidth"] = {**bandwidth, "all_gb_s": [bw["gb_s"] for bw in bandwidths]}
    for batch in cfg.batches:
        for m, x in out[f"b{batch}"].items():
            if m in ("hf_variants", "routed_vs_hf_per_repeat"):
                continue
            dtype = getattr(torch, x["dtype"]) if "dtype" in x else cfg.dtype
            rest = (adapters_read(m, batch) * one_adapter
                    + floor.kv_bytes(assets.base, dtype, batch, cfg.prompt_tokens, cfg.new_tokens))
            weights_read = (floor.int8_weight_bytes(assets.base, dtype) if m in QUANT_METHODS
                            else floor.weight_bytes(assets.base, dtype))
            x["floor_ms"] = round(floor.floor_ms(weights_read + rest, bandwidth["gb_s"]), 3)
            x["vs_floor"] = round(x["ms_per_step"] / x["floor_ms"], 2) if x["floor_ms"] else None
            if m in QUANT_METHODS:  # the same step with 16-bit weights: the floor no 16-bit engine passes
                sixteen = floor.weight_bytes(assets.base, torch.bfloat16) + rest
                x["floor16_ms"] = round(floor.floor_ms(sixteen, bandwidth["gb_s"]), 3)
                x["vs_floor16"] = round(x["ms_per_step"] / x["floor16_ms"], 2) if x["floor16_ms"] else None
    return out
