"""Serving through HTTP on loopback: 1/4/8/16 concurrent streaming clients with mixed adapters.

The server is the real thing (`switchboard serve`, a subprocess, on 127.0.0.1 and a free port);
`--server thread` runs uvicorn in a thread of this process instead (used by the tiny test run).
Each client streams one completion at a time (SSE) from the adapter `a{i mod 4}`, greedy, from a
64-token prompt; every `data:` chunk is one token. Reported per concurrency level: aggregate
tok/s (all tokens / wall time from the first request to the last chunk), TTFT and inter-token
latency p50/p99. The same run's PEFT mixed batch of 8 (decode section) is the baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

from bench.common import BenchConfig, log, percentile, ratio
from server.local import NotReady, free_port, stop_process, wait_ready

ADMIN_TOKEN = "bench-admin-token"


class Server:
    """A Switchboard server on 127.0.0.1:<random port>, as a subprocess or a uvicorn thread."""

    def __init__(self, cfg: BenchConfig, assets, mode: str = "subprocess", store=None) -> None:
        self.cfg, self.assets, self.mode = cfg, assets, mode
        self.store = store or assets.store  # the adapter store it serves
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.uvicorn = None
        self.log_path = assets.root / "server.log"

    def flags(self) -> list[str]:
        return ["--base-model", str(self.assets.model_dir()), "--adapter-dir", str(self.store),
                "--host", "127.0.0.1", "--port", str(self.port), "--admin-token", ADMIN_TOKEN,
                "--device", "cuda" if self.cfg.device.startswith("cuda") else "cpu",
                "--dtype", str(self.cfg.dtype).replace("torch.", ""),
                "--max-batch-size", "32", "--max-loras", "16", "--log-level", "warning"]

    def start(self, timeout: float = 180.0) -> None:
        if self.mode == "subprocess":
            env = {**os.environ, "OMP_NUM_THREADS": str(self.cfg.threads), "MKL_NUM_THREADS": str(self.cfg.threads),
                   "TOKENIZERS_PARALLELISM": "false"}
            self.proc = subprocess.Popen([sys.executable, "-m", "server.commands.cli", "serve", *self.flags()],
                                         stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, env=env,
                                         cwd=str(self.assets.root))
        else:
            self._start_thread()
        self._wait_ready(timeout)

    def _start_thread(self) -> None:
        import argparse

        import uvicorn

        from bench.common import clone
        from bench.rig import resident_from
        from server.app import create_app
        from server.commands.cli import _add_flags, settings_from_args

        parser = argparse.ArgumentParser()
        _add_flags(parser)
        settings = settings_from_args(parser.parse_args(self.flags()))
        resident = resident_from(clone(self.assets.base), self.assets.tokenizer, self.cfg)
        app = create_app(settings, resident=resident)
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, name="bench-uvicorn", daemon=True)
        self.thread.start()

    def _wait_ready(self, timeout: float) -> None:
        def dead() -> str | None:
            if self.proc is not None and self.proc.poll() is not None:
                return f"exit code {self.proc.returncode}"
            return None

        try:
            wait_ready(f"{self.url}/ready", timeout, dead=dead)
        except NotReady as e:
            raise RuntimeError(f"{e}: {self.log_tail()}") from None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
            self.thread.join(timeout=20)


# -- clients --------------------------------------------------------------------------------------------
async def stream_one(client, model: str, prompt: list[int], max_tokens: int, routing: dict | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if routing:
        body["routing"] = routing
    start = time.perf_counter()
    times: list[float] = []
    finish, error = None, None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
        else:
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"].get("message")
                    break
                times.append(time.perf_counter())
                finish = chunk["choices"][0].get("finish_reason") or finish
    return {"start": start, "times": times, "finish": finish, "error": error}


async def run_level(url: str, clients: int, rounds: int, prompts: list[list[int]], models: list[str],
                    max_tokens: int, routing: dict | None = None) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        async def worker(i: int) -> list[dict]:
            out = []
            for r in range(rounds):
                out.append(await stream_one(client, models[i % len(models)], prompts[(i + r) % len(prompts)],
                                            max_tokens, routing))
            return out

        results = await asyncio.gather(*(worker(i) for i in range(clients)))
    return [r for rs in results for r in rs]


def summarize(results: list[dict], clients: int) -> dict:
    errors = [r["error"] for r in results if r["error"]]
    done = [r for r in results if r["times"]]
    tokens = sum(len(r["times"]) for r in done)
    if not done:
        return {"clients": clients, "requests": len(results), "errors": errors, "tokens": 0}
    wall = max(r["times"][-1] for r in done) - min(r["start"] for r in done)
    ttft = [1000 * (r["times"][0] - r["start"]) for r in done]
    itl = [1000 * (b - a) for r in done for a, b in zip(r["times"], r["times"][1:], strict=False)]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors,
        "tokens": tokens,
        "seconds": round(wall, 3),
        "agg_tok_s": round(tokens / wall, 2),
        "per_client_tok_s": round(tokens / wall / clients, 2),
        "ttft_ms": {"p50": round(percentile(ttft, 0.5), 1), "p99": round(percentile(ttft, 0.99), 1),
                    "mean": round(sum(ttft) / len(ttft), 1)},
        "itl_ms": {"p50": round(percentile(itl, 0.5), 2), "p99": round(percentile(itl, 0.99), 2),
                   "mean": round(sum(itl) / max(len(itl), 1), 2)},
        "finish_reasons": sorted({str(r["finish"]) for r in done}),
        "samples": {"ttft_ms": [round(x, 1) for x in ttft], "itl_ms": [round(x, 2) for x in itl]},
    }


async def admin_register(url: str, path: str, repeats: int) -> dict:
    """Register / unregister an adapter through the admin API (validation + registry; the slot
    is filled on first use)."""
    import httpx

    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    load, unload = [], []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60.0) as client:
        for i in range(repeats):
            name = f"http-{path}-{i}"
            t = time.perf_counter()
            r = await client.post("/admin/adapters", json={"name": name, "path": path})
            load.append(1000 * (time.perf_counter() - t))
            r.raise_for_status()
            t = time.perf_counter()
            r = await client.delete(f"/admin/adapters/{name}")
            unload.append(1000 * (time.perf_counter() - t))
            r.raise_for_status()
    return {"path": path, "register_ms_p50": round(percentile(load, 0.5), 2),
            "unload_ms_p50": round(percentile(unload, 0.5), 2), "register_ms": [round(x, 2) for x in load]}


async def replace_under_load(url: str, clients: int, prompts: list[list[int]], models: list[str], max_tokens: int,
                             replacements: int) -> dict:
    """Issue 5: replace adapter `a0` (same name, new version) `replacements` times while `clients`
    streaming clients run; latency of each replacement and whether any request failed."""
    import httpx

    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    latencies: list[float] = []
    load = asyncio.create_task(run_level(url, clients, max(2, replacements // clients + 1), prompts, models, max_tokens))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60.0) as client:
        await asyncio.sleep(0.5)  # let the clients get going
        for _ in range(replacements):
            t = time.perf_counter()
            r = await client.post("/admin/adapters", json={"name": "a0", "path": "a0"})
            latencies.append(1000 * (time.perf_counter() - t))
            r.raise_for_status()
            await asyncio.sleep(0.05)
    results = await load
    return {"clients": clients, "replacements": replacements,
            "replace_ms": {"p50": round(percentile(latencies, 0.5), 2), "p99": round(percentile(latencies, 0.99), 2)},
            "requests": len(results), "errors": [r["error"] for r in results if r["error"]]}


def run(cfg: BenchConfig, assets, mode: str = "subprocess", peft_mixed8_tok_s: float | None = None) -> dict:
    import random

    rng = random.Random(7)
    vocab = len(assets.tokenizer)
    prompts = [[rng.randrange(1, vocab) for _ in range(cfg.prompt_tokens)] for _ in range(32)]
    models = [f"a{i}" for i in range(4)]
    server = Server(cfg, assets, mode)
    t = time.perf_counter()
    server.start()
    out: dict = {"server": mode, "startup_s": round(time.perf_counter() - t, 2), "new_tokens": cfg.serving_tokens,
                 "prompt_tokens": cfg.prompt_tokens, "rounds": cfg.serving_rounds, "adapters": models, "levels": {}}
    try:
        asyncio.run(run_level(server.url, 2, 1, prompts, models, 3))  # warm-up
        for c in cfg.concurrency:
            results = asyncio.run(run_level(server.url, c, cfg.serving_rounds, prompts, models, cfg.serving_tokens))
            out["levels"][str(c)] = summarize(results, c)
            s = out["levels"][str(c)]
            log(f"serving {c} clients: {s.get('agg_tok_s')} tok/s, TTFT p50 {s.get('ttft_ms', {}).get('p50')} ms, "
                f"ITL p50/p99 {s.get('itl_ms', {}).get('p50')}/{s.get('itl_ms', {}).get('p99')} ms")
        if (8 in cfg.concurrency and not cfg.quick) or cfg.tiny:  # the routed HTTP run: full mode only
            c = 8 if 8 in cfg.concurrency else cfg.concurrency[-1]
            results = asyncio.run(run_level(server.url, c, 1, prompts, ["auto"], cfg.serving_tokens,
                                            {"reroute_every": 2}))
            out["routed"] = summarize(results, c)
            log(f"serving {c} clients routed (auto, re-route every 2): {out['routed'].get('agg_tok_s')} tok/s")
        c = 8 if 8 in cfg.concurrency else cfg.concurrency[-1]
        out["replace_under_load"] = asyncio.run(replace_under_load(server.url, c, prompts, models, cfg.serving_tokens,
                                                                   4 if cfg.tiny else 10))
        rl = out["replace_under_load"]
        log(f"replacing a0 under {c} streaming clients: p50 {rl['replace_ms']['p50']} ms, "
            f"p99 {rl['replace_ms']['p99']} ms, {len(rl['errors'])} failed requests of {rl['requests']}")
        rank = "r16" if "r16" in assets.rank_folders else next(iter(assets.rank_folders))
        out["admin_register"] = asyncio.run(admin_register(server.url, rank, 2 if cfg.tiny else 5))
    finally:
        server.stop()
    eight = out["levels"].get("8")
    out["peft_mixed8_tok_s"] = peft_mixed8_tok_s
    out["http8_mixed_vs_peft_mixed8"] = ratio(eight.get("agg_tok_s") if eight else None, peft_mixed8_tok_s)
    return out

