"""Adapter lifecycle: register (disk → servable) and unload latency for r=8/16/64 against PEFT's
`load_adapter` / `delete_adapter`; memory per resident adapter against its parameter bytes; and
decode speed with 1/4/16/64 adapters resident.

Register = `read_adapter` (read + validate the PEFT folder) + `registry.register` + installing it
into an engine slot (what a first request would otherwise pay). Unload = `registry.remove` + the
engine freeing the slot. The files are in the page cache (just written), as they are on a server
that rescans its store.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from bench.common import BenchConfig, clone, decode_stats, log, random_prompts, ratio, route_window
from bench.rig import base_spec, engine_generate, make_engine, resident_from


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def engine_adapter_tensors(rig):
    """Every tensor the registry and the engine's slots hold for adapters (incl. stacked caches)."""
    for version in rig.registry.snapshot().values():
        for a, b in version.weights.tensors.values():
            yield a
            yield b
    for layer in rig.engine.slots.layers.values():
        yield from layer.lora_a
        yield from layer.lora_b
        for stack in layer._stacks.values():
            if stack is not None:
                yield from (stack.a_t, stack.b, stack.cols)


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def register_latency(cfg: BenchConfig, assets, rig) -> dict:
    from server.store.folder import read_adapter

    spec = base_spec(rig.resident)
    engine, registry = rig.engine, rig.registry
    out = {}
    for r in cfg.ranks:
        folder = assets.rank_folders[f"r{r}"]
        read, reg, install, total, unload = [], [], [], [], []
        for i in range(cfg.register_repeats + 1):
            name = f"lc-r{r}-{i}"
            t0 = time.perf_counter()
            weights = read_adapter(name, folder, spec)
            t1 = time.perf_counter()
            version, _ = registry.register(weights)
            t2 = time.perf_counter()
            engine.slots.ensure([version])
            t3 = time.perf_counter()
            registry.remove(name)
            engine.slots.evict_retired()
            t4 = time.perf_counter()
            if i == 0:
                continue  # the first round imports and warms caches
            read.append(1000 * (t1 - t0))
            reg.append(1000 * (t2 - t1))
            install.append(1000 * (t3 - t2))
            total.append(1000 * (t3 - t0))
            unload.append(1000 * (t4 - t3))
        out[f"r{r}"] = {"register_ms": _median(total), "read_validate_ms": _median(read), "registry_ms": _median(reg),
                        "slot_install_ms": _median(install), "unload_ms": _median(unload),
                        "param_bytes": weights.nbytes}
    return out


def peft_latency(cfg: BenchConfig, assets) -> dict:
    peft_model = assets.peft()
    out = {}
    for r in cfg.ranks:
        folder = str(assets.rank_folders[f"r{r}"])
        load, unload = [], []
        for i in range(cfg.register_repeats + 1):
            name = f"peft-r{r}-{i}"
            t0 = time.perf_counter()
            peft_model.load_adapter(folder, adapter_name=name)
            t1 = time.perf_counter()
            peft_model.delete_adapter(name)
            t2 = time.perf_counter()
            if i:
                load.append(1000 * (t1 - t0))
                unload.append(1000 * (t2 - t1))
        out[f"r{r}"] = {"load_adapter_ms": _median(load), "delete_adapter_ms": _median(unload)}
    return out


def memory(cfg: BenchConfig, assets, rig) -> dict:
    """Bytes the engine holds per resident adapter (its registry copy + its slot tensors, distinct
    storages counted once) against the adapter's parameter bytes, for `count` copies of the r16
    adapter; the same for PEFT (`load_adapter`); and the engine's stacked-factor cache (the
    concatenated A/B of each active set, kept per layer) after the decode section's runs.
    Tensor accounting, not RSS: the allocator reuses freed memory, so RSS deltas say little here."""
    from server.store.folder import read_adapter

    count = 4 if cfg.tiny else 16
    rank_name = "r16" if "r16" in assets.rank_folders else next(iter(assets.rank_folders))
    folder = assets.rank_folders[rank_name]
    spec = base_spec(rig.resident)
    before = tensor_bytes(engine_adapter_tensors(rig))
    versions = []
    for i in range(count):
        versions.append(rig.registry.register(read_adapter(f"mem-{i}", folder, spec))[0])
    rig.engine.slots.ensure(versions[: rig.engine.slots.num_slots])
    after = tensor_bytes(engine_adapter_tensors(rig))
    param = versions[0].weights.nbytes
    for v in versions:
        rig.registry.remove(v.name)
    rig.engine.slots.evict_retired()
    per = (after - before) / count
    engine = {"adapters": count, "param_bytes": param, "held_bytes_per_adapter": int(per),
              "held_vs_param": ratio(per, param),
              "note": "slot tensors share the registry copy when device and dtype match (CPU, fp32 adapters "
                      "in fp32); otherwise (a GPU, or bf16) the slot is a converted copy beside the registry's"}
    peft_model = assets.peft()
    names = [f"pmem-{i}" for i in range(count)]
    for name in names:
        peft_model.load_adapter(str(folder), adapter_name=name)
    held = tensor_bytes(p for n, p in peft_model.named_parameters() if any(f".{x}." in n for x in names))
    for name in names:
        peft_model.delete_adapter(name)
    peft = {"adapters": count, "held_bytes_per_adapter": int(held / count), "held_vs_param": ratio(held / count, param)}
    return {"adapter": rank_name, "engine": engine, "peft": peft}


def stack_cache(assets, rig) -> dict:
    """The engine's stacked-factor cache as the decode section left it (filling a slot clears it,
    so this is read before anything else here touches the slots)."""
    stacks = [t for layer in rig.engine.slots.layers.values() for st in layer._stacks.values() if st
              for t in (st.a_t, st.b, st.cols)]
    routed = sum(rig.registry.get(n).weights.nbytes for n in assets.folders if n in rig.registry)
    return {"bytes": tensor_bytes(stacks), "routed_adapters_param_bytes": routed,
            "vs_routed_adapters": ratio(tensor_bytes(stacks), routed),
            "max_cached_sets_per_layer": getattr(type(next(iter(rig.engine.slots.layers.values()))),
                                                 "max_cached_stacks", None)}


def resident_sweep(cfg: BenchConfig, assets) -> dict:
    """Decode steps (batch 8) with N adapters resident in the engine's slots: rows on fixed
    adapters (row i → adapter i mod N), and rows routed over all N with top-2 truncation.
    Prompts are short (16 tokens): the figure is the decode step, prefill excluded. The counts
    run round-robin `repeats` times (fastest counts), re-registering the first N adapters each time."""
    from server.engine.sequence import RoutingSpec
    from server.store.folder import read_adapter

    counts = cfg.resident_counts
    resident = resident_from(clone(assets.base), assets.tokenizer, cfg)
    rig = make_engine(resident, {}, cfg, max_loras=max(counts), routed=True, store=assets.store)
    spec = base_spec(resident)
    rank_name = "r16" if "r16" in assets.rank_folders else next(iter(assets.rank_folders))
    folder = assets.rank_folders[rank_name]
    dim = resident.model.config.n_embd
    gen = torch.Generator().manual_seed(5)
    weights = []
    for i in range(max(counts)):
        w = read_adapter(f"res{i}", folder, spec)
        w.centroids = torch.nn.functional.normalize(torch.randn(1, dim, generator=gen), dim=-1)
        w.centroid_embedder = f"base:{route_window()}"
        weights.append(w)
    batch = 8
    prompts = random_prompts(cfg, batch, resident.model.config.vocab_size, seed=11)[:, :16]
    out: dict = {"batch": batch, "prompt_tokens": prompts.shape[1], "new_tokens": cfg.resident_tokens,
                 "adapter": rank_name, "repeats": cfg.resident_repeats, "fixed": {}, "routed_top2": {}}
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(max(1, cfg.resident_repeats)):
        for n in counts:
            for name in rig.registry.names():
                rig.registry.remove(name)
            rig.engine.slots.evict_retired()
            versions = [rig.registry.register(w)[0] for w in weights[:n]]
            rig.routing.rebuild()
            rig.engine.slots.ensure(versions)
            fixed = [RoutingSpec("fixed", {f"res{i % n}": 1.0}) for i in range(batch)]
            routed = [RoutingSpec("auto", router="centroid", reroute_every=2, top_k=2)] * batch
            engine_generate(rig, prompts[:, :4], 2, fixed)  # warm-up (stacked factors)
            for key, specs in (("fixed", fixed), ("routed_top2", routed)):
                r = engine_generate(rig, prompts, cfg.resident_tokens, specs)
                stats = decode_stats(batch, cfg.resident_tokens, r["seconds"], r["ttft"], r["all_first"])
                stats["resident"] = len(rig.engine.slots.resident())
                runs.setdefault((key, n), []).append(stats)
    for (key, n), rs in runs.items():
        out[key][str(n)] = min(rs, key=lambda s: s["ms_per_step"])
    for n in counts:
        log(f"resident {n}: fixed {out['fixed'][str(n)]['ms_per_step']} ms/step, routed top-2 "
            f"{out['routed_top2'][str(n)]['ms_per_step']} ms/step")
    one = str(counts[0])
    for key in ("fixed", "routed_top2"):
        for s in out[key].values():  # speed relative to 1 resident adapter (> 1 = faster)
            s["vs_1"] = ratio(out[key][one]["ms_per_step"], s["ms_per_step"])
    del rig, resident
    gc.collect()
    return out


def run(cfg: BenchConfig, assets) -> dict:
    rig = assets.engine_rig()
    out: dict = {"targets": ["c_attn", "c_proj"]}
    stacks = stack_cache(assets, rig)
    out["engine"] = register_latency(cfg, assets, rig)
    log("register " + ", ".join(f"{k} {v['register_ms']} ms" for k, v in out["engine"].items()))
    out["peft"] = peft_latency(cfg, assets)
    log("PEFT load_adapter " + ", ".join(f"{k} {v['load_adapter_ms']} ms" for k, v in out["peft"].items()))
    for k, v in out["engine"].items():
        v["vs_peft_load_adapter"] = ratio(out["peft"][k]["load_adapter_ms"], v["register_ms"])
    out["memory"] = memory(cfg, assets, rig)
    out["memory"]["stacked_factor_cache"] = stacks
    out["resident"] = resident_sweep(cfg, assets)
    return out
