"""What re-routing every N tokens costs against routing once, per embedder:
`python -m bench.reroute [--embedder base|minilm] [--batch 1] [--threads 1]`.

GPT-2 124M shape (random weights), 4 adapters (r=16) with random centroids in the embedder's
space, prompt 64 tokens, greedy. The same sequences are decoded routed once on the prompt and
re-routed every 2 tokens, interleaved; the fastest of the repeats counts. With a sentence
encoder, the engine starts each re-route one step early on a side thread, so it overlaps the
decode forward; with `base` the router pools hidden states the step already computed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def measure(embedder: str, batch: int, new_tokens: int, repeats: int, every: int = 2) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.common import BenchConfig, build_tokenizer
    from bench.rig import resident_from
    from server.build import build_routing
    from server.engine.adapter_weights import AdapterWeights
    from server.engine.engine import Engine, EngineConfig
    from server.engine.registry import AdapterRegistry
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import RoutingSpec, Sequence
    from server.settings import RoutingSettings

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    tok = build_tokenizer()
    vocab = len(tok)
    resident = resident_from(model, tok, BenchConfig.make(device="cpu", threads=torch.get_num_threads()))
    registry = AdapterRegistry()
    store = Path(tempfile.mkdtemp(prefix="switchboard-reroute-"))
    routing, gater = build_routing(RoutingSettings(embedder=embedder), resident, registry, store)
    rank = 16
    for i in range(4):
        tensors = {p: (torch.randn(d_in, rank) * 0.01, torch.randn(rank, d_out) * 0.01)
                   for p, (d_in, d_out) in resident.module_shapes.items() if p.endswith(("c_attn", "attn.c_proj"))}
        centroid = F.normalize(torch.randn(1, routing.dim), dim=-1)
        registry.register(AdapterWeights(f"a{i}", store, rank, 32, 2.0, ["c_attn", "c_proj"], tensors,
                                         centroids=centroid, centroid_embedder=routing.embedder_id))
    routing.rebuild()
    engine = Engine(resident, registry, EngineConfig(max_loras=8, max_batch_size=batch), gate_source=gater)
    gen = torch.Generator().manual_seed(1)
    prompts = [[int(x) for x in torch.randint(1, vocab, (64,), generator=gen)] for _ in range(batch)]

    def run(reroute_every: int, n: int) -> float:
        done: list[int] = []
        for prompt in prompts:
            seq = Sequence(prompt_ids=prompt, max_tokens=n, sampling=SamplingParams(temperature=0.0),
                           routing=RoutingSpec("auto", router="centroid", reroute_every=reroute_every),
                           decode=lambda ids: tok.decode([i % vocab for i in ids]),
                           emit=lambda ev: done.append(1) if ev.finish_reason else None)
            seq.versions = {v.name: v for v in registry.acquire([f"a{i}" for i in range(4)])}
            engine.submit(seq)
        start = time.perf_counter()
        while engine.has_work():
            engine.step()
        return time.perf_counter() - start

    run(0, 4), run(every, 4)  # warm-up
    times: dict[int, list[float]] = {0: [], every: []}
    for _ in range(repeats):
        for e in (0, every):
            times[e].append(run(e, new_tokens))
    once, rerouted = min(times[0]), min(times[every])
    return {"embedder": routing.embedder_id, "batch": batch, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
            "once_s": round(once, 3), "rerouted_s": round(rerouted, 3), "reroute_every": every,
            "slowdown_pct": round(100 * (rerouted / once - 1), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reroute", description=__doc__.split("\n\n")[0])
    p.add_argument("--embedder", default="minilm", help="base | minilm | a sentence-encoder folder")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        result = measure(args.embedder, args.batch, args.new_tokens, args.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
