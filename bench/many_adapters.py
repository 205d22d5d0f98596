"""Many adapters in one store (`python -m bench --only many-adapters`): what a store of N
adapters costs a real server (`switchboard serve`, a subprocess on loopback).

For each N (`--adapters-n`, default `0,100`; `--adapters-1000` adds 1000) it writes N rank-16
(`--adapters-rank`)
PEFT adapters for the base's shape (c_attn and both c_proj, as the rest of the suite) and a
manifest listing them (the store a restarted server finds), then reports:

* `start_to_ready_s`: from spawning the server to `/ready` answering 200 (N = 0 is the base
  model alone, the same run's baseline, so `ready_over_base_s` is what the store adds);
* `rss_mb`: the server's resident memory at `/ready` (and `rss_over_base_mb`);
* `register_ms_p50`: registering one more adapter through the admin API (and unloading it),
  p50 of 9 after the first (`register_first_ms`, timed apart: it builds FastAPI's admin routes);
* tok/s of 8 streaming clients all on one adapter vs on 8 distinct adapters drawn from all N,
  in steady state: each round draws 8 adapters the run has not used, serves them one token
  each first (untimed for tok/s: their factors come from disk, are checked and installed), then
  times the one-adapter and the 8-adapter level (32 tokens each, the order alternating per
  round), the median of each: `distinct8_vs_one` (what serving 8 different adapters costs once
  they are in memory: the LoRA work and factor bytes of 8 adapters instead of 1);
* the first use on its own: the wall time of that one-token level on 8 adapters still on disk
  (`distinct8_first_use_s`) against the same level on the one warm adapter right after
  (`one_warm_s`), medians over the rounds: `first_use_vs_warm` (what a cold adapter adds; it
  depends on the disk and the page cache, so it is reported apart);
* `sigterm_exit`: the exit code after SIGTERM (0: drained and exited cleanly).

Above `distinct_files` adapters the weight files are hard links to the first ones' (distinct
folders, configs and names, shared bytes on disk), so 10,000 fit a small disk. The store is
deleted after each N.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import BenchConfig, log, percentile, ratio

TARGETS = ("c_attn", "c_proj")


def module_shapes(n_layer: int, n_embd: int) -> dict[str, tuple[int, int]]:
    """GPT-2's LoRA targets of this suite, module path -> (in, out)."""
    out = {}
    for i in range(n_layer):
        h = f"transformer.h.{i}"
        out[f"{h}.attn.c_attn"] = (n_embd, 3 * n_embd)
        out[f"{h}.attn.c_proj"] = (n_embd, n_embd)
        out[f"{h}.mlp.c_proj"] = (4 * n_embd, n_embd)
    return out


def write_store(store: Path, n: int, n_layer: int, n_embd: int, rank: int = 16, *, prefix: str = "m",
                seed: int = 0, distinct_files: int = 1000, manifest: bool = True) -> list[str]:
    """N PEFT LoRA folders `<prefix>00000`… with random factors (B small, so activations stay
    finite) and, with `manifest`, a `_manifest.json` listing them all. Returns their names."""
    store.mkdir(parents=True, exist_ok=True)
    shapes = module_shapes(n_layer, n_embd)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
              "fan_in_fan_out": True, "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "gpt2-random"}
    names = []
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        name = f"{prefix}{i:05d}"
        folder = store / name
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        if i < distinct_files:
            tensors = {}
            for module, (d_in, d_out) in shapes.items():
                key = f"base_model.model.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
            save_file(tensors, str(folder / "adapter_model.safetensors"))
        else:
            os.link(store / names[i % distinct_files] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
        names.append(name)
    if manifest:
        body = {"adapters": [{"name": n, "path": n, "pinned": False} for n in names], "routers": []}
        (store / "_manifest.json").write_text(json.dumps(body))
    return names


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def measure(cfg: BenchConfig, assets, n: int, rounds: int, tokens: int, rng: random.Random, rank: int = 16) -> dict:
    from bench.serving import ADMIN_TOKEN, Server, run_level, summarize

    store = assets.root / f"many-{n}"
    t = time.perf_counter()
    names = write_store(store, n, assets.base.config.n_layer, assets.base.config.n_embd, rank)
    write_store(store, 1, assets.base.config.n_layer, assets.base.config.n_embd, rank, prefix="extra", seed=99,
                manifest=False)
    out: dict = {"n": n, "rank": rank, "write_s": round(time.perf_counter() - t, 1)}
    server = Server(cfg, assets, "subprocess", store=store)
    t = time.perf_counter()
    try:
        server.start()
        out["start_to_ready_s"] = round(time.perf_counter() - t, 2)
        assert server.proc is not None
        out["rss_mb"] = _rss_mb(server.proc.pid)
        out["register_ms_p50"], out["register_first_ms"] = asyncio.run(_register(server.url, ADMIN_TOKEN, 9))
        if n:
            vocab = len(assets.tokenizer)
            prompts = [[rng.randrange(1, vocab) for _ in range(cfg.prompt_tokens)] for _ in range(16)]
            asyncio.run(run_level(server.url, 2, 1, prompts, names[:2], 2))  # warm-up
            one, distinct, cold, warm = [], [], [], []
            unused = [name for name in names if name not in names[:2]]
            rng.shuffle(unused)
            for i in range(rounds):  # interleaved: both see the same machine load
                drawn = [unused.pop() for _ in range(min(8, len(unused)))] or names[:8]
                t = time.perf_counter()  # first use: read from disk, checked, installed
                cold.append(summarize(asyncio.run(run_level(server.url, 8, 1, prompts, drawn, 1)), 8))
                cold[-1]["wall_s"] = time.perf_counter() - t
                t = time.perf_counter()
                warm.append(summarize(asyncio.run(run_level(server.url, 8, 1, prompts, [names[0]] * 8, 1)), 8))
                warm[-1]["wall_s"] = time.perf_counter() - t
                for which in (("one", "distinct") if i % 2 == 0 else ("distinct", "one")):
                    models = [names[0]] * 8 if which == "one" else drawn
                    res = summarize(asyncio.run(run_level(server.url, 8, 1, prompts, models, tokens)), 8)
                    (one if which == "one" else distinct).append(res)
            out["one_tok_s"] = statistics.median(s.get("agg_tok_s", 0.0) for s in one)
            out["distinct8_tok_s"] = statistics.median(s.get("agg_tok_s", 0.0) for s in distinct)
            out["distinct8_vs_one"] = ratio(out["distinct8_tok_s"], out["one_tok_s"])
            out["distinct8_first_use_s"] = round(statistics.median(s["wall_s"] for s in cold), 3)
            out["one_warm_s"] = round(statistics.median(s["wall_s"] for s in warm), 3)
            out["first_use_vs_warm"] = ratio(out["distinct8_first_use_s"], out["one_warm_s"])
            out["errors"] = [e for s in one + distinct + cold + warm for e in s.get("errors", [])][:5]
            out["rss_after_mb"] = _rss_mb(server.proc.pid)
    finally:
        if server.proc is not None and server.proc.poll() is None:
            from server.local import stop_process

            out["sigterm_exit"] = stop_process(server.proc, timeout=60.0)
        else:
            server.stop()
        shutil.rmtree(store, ignore_errors=True)
    log(f"many-adapters N={n}: ready {out.get('start_to_ready_s')} s, RSS {out.get('rss_mb')} MB, register "
        f"{out.get('register_ms_p50')} ms, distinct8/one {out.get('distinct8_vs_one')}")
    return out


async def _register(url: str, token: str, repeats: int) -> tuple[float, float]:
    """(p50 of `repeats` registrations, the first one): the first request to the admin routes after
    `/ready` is timed apart (~150 ms on the shared 2-core machine: FastAPI builds a router's
    routes on its first request, and the server's allocator first grows for 6.5 MB of factors),
    as `bench.lifecycle` drops its first round; the p50 is the steady state."""
    import httpx

    times = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0) as client:
        for i in range(repeats + 1):
            t = time.perf_counter()
            r = await client.post("/admin/adapters", json={"name": f"reg{i}", "path": "extra00000"})
            times.append(1000 * (time.perf_counter() - t))
            r.raise_for_status()
            (await client.delete(f"/admin/adapters/reg{i}")).raise_for_status()
    return round(percentile(times[1:], 0.5), 2), round(times[0], 2)


def run(cfg: BenchConfig, assets, counts: tuple[int, ...], rank: int = 16) -> dict:
    rng = random.Random(26)
    rounds = 1 if cfg.tiny else 5  # medians of 5: the levels are seconds long on a shared machine
    tokens = 8 if cfg.tiny else 32
    results = {str(n): measure(cfg, assets, n, rounds, tokens, rng, rank) for n in sorted(set(counts))}
    base = results.get("0", {})
    for r in results.values():
        if base.get("start_to_ready_s") is not None and r.get("start_to_ready_s") is not None:
            r["ready_over_base_s"] = round(r["start_to_ready_s"] - base["start_to_ready_s"], 2)
        if base.get("rss_mb") is not None and r.get("rss_mb") is not None:
            r["rss_over_base_mb"] = round(r["rss_mb"] - base["rss_mb"], 1)
    return results
