"""The CUDA checks in one run (`scripts/gpu_check.sh`): what the CPU tests can only approximate.

    python -m bench.gpu_check [--out DIR] [--no-bench] [--only parity,syncs,...]   # with CUDA
    python -m bench.gpu_check --device cpu --step static     # the same code on CPU (a smoke run)

Writes `DIR/gpu_check.json` and `DIR/gpu_check.md` (default `bench/results/gpu_check/`) and exits
1 if a check failed. Without CUDA (and no `--device cpu`) it says so and exits 0. The checks,
each on the tiny test model built in code (no download) unless said otherwise:

1. parity: the engine (compiled step: CUDA graphs) in fp16 and in bf16 (where the GPU has it)
   against PEFT in the same dtype, both against PEFT in fp32, over a two-adapter mixture and
   one adapter: greedy tokens and each token's log-prob. Passes when the engine's log-prob error
   against fp32 is at most twice PEFT's own in that dtype (+1e-3), as the CPU bf16 test demands.
2. syncs: a steady-state decode step (3 rows, fixed mixtures, greedy and seeded sampling)
   under `torch.cuda.set_sync_debug_mode("warn")`: the synchronizing CUDA calls per step, and
   the `TorchFunctionMode` count the CPU test uses. Budget: at most 2 per step. In the dtype
   `--dtype auto` serves (bf16 from sm80, fp16 below), as are the graphs.
   reroute_syncs: the same with every row re-routing before every token (centroid router):
   2 rows and 6, at most 3 per step (the gater reads once for all rows), the same for both.
3. graphs: the compiled engine warmed up, then served batches of 1, 3 and 5 rows, long rows
   crossing length buckets, re-gated mixtures and a hot swap: graphs compiled after warm-up
   (target 0) and whether the KV cache kept its address.

Every engine starts from a reset compiler (`torch._dynamo.reset()`): the checks build several
engines in one process, and each new one's cache and weights fail the last one's guards, so
without a reset they would run into dynamo's recompile limit and the later checks would
silently measure the eager step.
4. bench: `python -m bench --quick --only decode --compile` on GPT-2 124M (random weights):
   the eager, static and compiled engines interleaved in one run; `compiled ÷ eager` of tok/s
   is what decides whether `--compile auto` (compiled on CUDA) holds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def _store(root: Path) -> tuple[Path, Path]:
    from tests.tiny import make_adapter, save_model

    model_dir = save_model(root / "model")
    for name, seed in (("alpha", 1), ("beta", 2)):
        make_adapter(model_dir, root / "store" / name, seed=seed)
    return model_dir, root / "store"


def _engine(model_dir: Path, store: Path, device: str, dtype: str, step: str, **config: Any):
    from server.engine.adapter_weights import BaseSpec
    from server.engine.base_model import load_base_model
    from server.engine.engine import Engine, EngineConfig
    from server.engine.registry import AdapterRegistry
    from server.store.folder import read_adapter

    if step == "compiled":  # a clean compiler and CUDA graph trees per engine (see the module doc)
        torch._dynamo.reset()
    resident = load_base_model(str(model_dir), device, dtype)
    registry = AdapterRegistry()
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64, resident.dtype)
    for name in ("alpha", "beta"):
        registry.register(read_adapter(name, store / name, spec))
    # on CPU (a smoke run) the cache is allocated up front as on CUDA
    engine = Engine(resident, registry, EngineConfig(**{"max_loras": 4, "max_batch_size": 8, "decode_step": step,
                                                        "full_cache": True, **config}))
    engine.warm_up()
    return engine


def _row(engine, prompt: list[int], weights: dict[str, float], max_tokens: int, **sampling: Any):
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import RoutingSpec, Sequence

    seq = Sequence(prompt_ids=list(prompt), max_tokens=max_tokens,
                   sampling=SamplingParams(**{"temperature": 0.0, **sampling}), routing=RoutingSpec("fixed", weights),
                   decode=lambda ids: "x" * len(ids), emit=lambda ev: None)
    seq.versions = {v.name: v for v in engine.registry.acquire(list(weights))}
    return seq


def _run(engine, seqs) -> dict[int, list]:
    from tests.tiny import run_engine

    return run_engine(engine, seqs)


PROMPT = [5, 17, 42, 8, 99, 3, 250, 11, 64]


def check_parity(model_dir: Path, store: Path, device: str, step: str) -> dict:
    from tests.tiny import peft_reference

    dtypes = ["float16"]
    if device == "cpu" or torch.cuda.is_bf16_supported():
        dtypes.append("bfloat16")
    out: dict[str, Any] = {"passed": True}
    mixes = [{"alpha": 1.0}, {"alpha": 0.6, "beta": 0.4}]
    for mix in mixes if device == "cuda" else mixes[1:]:  # the CPU smoke run: the mixture alone
        engine = None
        for dtype in dtypes:
            engine = _engine(model_dir, store, device, dtype, step)
            seq = _row(engine, PROMPT, mix, 12)
            events = _run(engine, [seq])[seq.id]
            tokens = [e.token_id for e in events if e.token_id is not None]
            got = torch.tensor([e.logprob for e in events if e.token_id is not None], dtype=torch.float64)
            ids = torch.tensor([PROMPT + tokens], device=device)
            ref: dict[str, torch.Tensor] = {}
            for name, dt in (("fp32", torch.float32), (dtype, getattr(torch, dtype))):
                peft = peft_reference(model_dir, store, mix).to(device=device, dtype=dt)
                with torch.inference_mode():
                    logits = peft(ids).logits[0, len(PROMPT) - 1:-1].double()  # [T, V]
                ref[name] = logits.log_softmax(-1).gather(1, ids[0, len(PROMPT):, None].to(device))[:, 0].cpu()
            engine_err = float((got - ref["fp32"]).abs().max())
            peft_err = float((ref[dtype] - ref["fp32"]).abs().max())
            ok = engine_err <= 2 * peft_err + 1e-3
            out[f"{dtype} {'+'.join(mix)}"] = {"engine_vs_fp32": engine_err, "peft_vs_fp32": peft_err, "passed": ok,
                                               "tokens": len(tokens)}
            out["passed"] &= ok
        del engine
    return out


def _count_syncs(engine, seqs, device: str, budget: int, steps: int = 16) -> dict:
    """Submit `seqs`, step past the prefill, then count the device reads of `steps` steps: under
    `set_sync_debug_mode("warn")` on CUDA (what decides `passed` there) and with the CPU test's
    `TorchFunctionMode` everywhere."""
    from tests.syncs import SyncCounter

    for seq in seqs:
        seq.emit = lambda ev: None
        engine.submit(seq)
    for _ in range(3):  # prefill and the first steps
        engine.step()
    cuda = device == "cuda"
    with warnings.catch_warnings(record=True) as caught, SyncCounter() as counter:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    cuda_syncs = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()]
    per_step = (len(cuda_syncs) if cuda else counter.total) / steps
    return {"dtype": str(engine.resident.dtype), "rows": len(seqs), "steps": steps,
            "cuda_syncs_per_step": len(cuda_syncs) / steps if cuda else None,
            "counted_reads_per_step": counter.total / steps, "sites": dict(counter.sites),
            "cuda_sync_messages": sorted(set(cuda_syncs))[:10], "budget": budget,
            "passed": per_step <= budget and all(s.finish_reason is None for s in seqs)}


def check_syncs(model_dir: Path, store: Path, device: str, step: str) -> dict:
    engine = _engine(model_dir, store, device, _serving_dtype(device), step)
    seqs = [_row(engine, PROMPT, {"alpha": 1.0}, 40),
            _row(engine, PROMPT[:5], {"alpha": 0.5, "beta": 0.5}, 40, temperature=0.8, seed=3),
            _row(engine, PROMPT[:3], {}, 40, temperature=1.0, top_p=0.9)]
    return _count_syncs(engine, seqs, device, budget=2)


def check_reroute_syncs(model_dir: Path, store: Path, device: str, step: str) -> dict:
    """Every row re-routes before every token (`reroute_every=1`, the centroid router on the
    base embedder, voting, with a switch margin): 2 rows and 6, each within 3 reads per step
    (the steady 2 and the gater's one for all rows), the same count for both."""
    import torch.nn.functional as F

    from server.build import build_routing
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import RoutingSpec, Sequence
    from server.settings import RoutingSettings

    out: dict[str, Any] = {}
    for n in (2, 6):
        engine = _engine(model_dir, store, device, _serving_dtype(device), step)
        catalogue, gater = build_routing(RoutingSettings(embedder="base", route_switch_margin=0.01),
                                         engine.resident, engine.registry, store)
        gen = torch.Generator().manual_seed(0)
        for version in engine.registry.snapshot().values():
            version.weights.centroids = F.normalize(torch.randn(20, catalogue.dim, generator=gen), dim=-1)
            version.weights.centroid_embedder = catalogue.embedder_id
        catalogue.rebuild()
        engine.gate_source = gater  # the engine's routing step asks the gater from here on
        engine.route_step.source = gater
        seqs = []
        for i in range(n):
            seq = Sequence(prompt_ids=PROMPT[i % 3:], max_tokens=40, sampling=SamplingParams(temperature=0.0),
                           routing=RoutingSpec("auto", router="centroid", reroute_every=1),
                           decode=lambda ids: "x" * len(ids), emit=lambda ev: None)
            seq.versions = {v.name: v for v in engine.registry.acquire(["alpha", "beta"])}
            seqs.append(seq)
        out[f"rows_{n}"] = _count_syncs(engine, seqs, device, budget=3)
        out[f"rows_{n}"]["passed"] &= all(s.route.reroutes == len(s.generated) for s in seqs)
    counts = [out[k]["cuda_syncs_per_step" if device == "cuda" else "counted_reads_per_step"] for k in out]
    out["passed"] = all(r["passed"] for r in out.values()) and counts[0] == counts[1]
    return out


def check_graphs(model_dir: Path, store: Path, device: str, step: str) -> dict:
    from torch._dynamo.utils import counters

    from server.engine.adapter_weights import BaseSpec
    from server.store.folder import read_adapter

    if step == "eager":
        return {"skipped": "the eager step (--step eager) has no fixed-shape graphs to check", "passed": True}
    torch._dynamo.reset()
    engine = _engine(model_dir, store, device, _serving_dtype(device), step)
    warm = counters["stats"]["unique_graphs"]
    cache = [t.data_ptr() for t in (*engine.cache.keys, *engine.cache.values)]
    mixes = [{"alpha": 0.5, "beta": 0.5}, {"beta": 1.0}, {}, {"alpha": 1.0}, {"alpha": 0.2, "beta": 0.8}]
    _run(engine, [_row(engine, PROMPT, {"alpha": 1.0}, 100)])
    _run(engine, [_row(engine, PROMPT[: 3 + i], mixes[i], 10 + 5 * i) for i in range(5)])
    seqs = [_row(engine, PROMPT, mixes[i], 12) for i in range(3)]
    for s in seqs:
        engine.submit(s)
    n = 0
    while engine.has_work():  # re-gating every step, as the router does
        engine.step()
        n += 1
        for i, s in enumerate(engine.running):
            s.route.gates = dict(mixes[(i + n) % 3])
            new = [k for k in s.route.gates if k not in s.versions]  # held as a request holds them
            s.versions.update({v.name: v for v in engine.registry.acquire(new)})
    spec = BaseSpec(engine.resident.module_shapes, engine.resident.fingerprint, 64, engine.resident.dtype)
    engine.registry.register(read_adapter("alpha", store / "beta", spec))  # hot swap
    _run(engine, [_row(engine, PROMPT, {"alpha": 1.0}, 6), _row(engine, PROMPT[:4], {"beta": 1.0}, 6)])
    after = counters["stats"]["unique_graphs"] - warm
    moved = [t.data_ptr() for t in (*engine.cache.keys, *engine.cache.values)] != cache
    assert engine.static is not None
    return {"dtype": str(engine.resident.dtype), "graphs_after_warm_up": after, "cache_moved": moved,
            "steps": engine.static.calls,
            "cudagraphs": engine.static.graphs, "passed": after == 0 and not (moved and engine.cache.full)}


def run_bench(out: Path, device: str) -> dict:
    """The decode section with `--compile`, as a subprocess (its own torch state)."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", "decode", "--compile", "--device", device,
           "--out", str(out / "bench")]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": done.returncode,
                              "seconds": round(time.perf_counter() - start, 1), "passed": done.returncode == 0}
    path = out / "bench" / "results.json"
    if path.exists():
        data = json.loads(path.read_text())
        result["ratios"] = {k: v for k, v in data.get("ratios", {}).items() if "compiled" in k or "static" in k
                            or "vs_hf" in k or "floor" in k}
        decode = data.get("decode", {})
        result["step_warm_up_s"] = decode.get("step_warm_up_s")
        result["recompiles_after_warm_up"] = decode.get("recompiles_after_warm_up")
        # `--compile auto` compiles on CUDA: it holds when the compiled step beats the eager one
        steps = [result["ratios"].get(f"compiled_vs_eager_step_b{b}") for b in (1, 8)]
        result["compile_auto_holds"] = all(r is not None and r > 1 for r in steps)
    else:
        result["stderr_tail"] = done.stderr[-2000:]
    return result


def markdown(report: dict) -> str:
    lines = [f"# gpu_check on {report['device']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, compute capability {report.get('capability')}, "
             f"`--dtype auto` = {report.get('dtype_auto')}, step `{report['step']}`; "
             f"{'all passed' if report['passed'] else 'FAILED: ' + ', '.join(report['failed'])}", ""]
    for name, result in report["checks"].items():
        lines += [f"## {name}: {'passed' if result.get('passed') else 'FAILED'}", "", "```json",
                  json.dumps(result, indent=2, default=str), "```", ""]
    return "\n".join(lines)


CHECKS = ("parity", "syncs", "reroute_syncs", "graphs", "bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of this code")
    p.add_argument("--step", default="compiled", choices=("compiled", "static", "eager"))
    p.add_argument("--no-bench", action="store_true", help="skip the decode benchmark (minutes)")
    p.add_argument("--only", default=",".join(CHECKS),
                   help=f"comma-separated checks to run, of {','.join(CHECKS)} (default: all) -- for a short device lease")
    args = p.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        p.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    args.only = only
    args.out = args.out.resolve()  # the bench subprocess runs in the repository, not here
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); nothing was checked. Run it on a machine with an NVIDIA GPU "
              "and a CUDA build of torch; the CPU tests cover what they can (docs/performance.md).")
        return 0
    from server.engine import tokens

    previous = tokens.DEVICE_SAMPLING_ON_CPU
    tokens.DEVICE_SAMPLING_ON_CPU = previous or args.device == "cpu"  # the CPU smoke run takes the CUDA sampling path too
    try:
        return _check_all(args)
    finally:  # called in-process by the tests: leave the engine's sampler as it was
        tokens.DEVICE_SAMPLING_ON_CPU = previous


def _serving_dtype(device: str) -> str:
    """What `--dtype auto` serves on `device` (bf16 from sm80 on CUDA, fp16 below), for the checks
    that measure the server as it runs; fp32 for the CPU smoke run."""
    from server.engine.base_model import resolve_dtype

    return str(resolve_dtype("auto", torch.device(device))).removeprefix("torch.") if device == "cuda" else "float32"


def _check_all(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                              "cuda": torch.version.cuda, "step": args.step, "checks": {},
                              "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
                              "dtype_auto": _serving_dtype(args.device) if cuda else None}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model_dir, store = _store(Path(tmp))
        except Exception as e:  # no model, no checks: still a report that says why
            model_dir = store = None
            report["checks"]["setup"] = {"passed": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        checks = {"parity": check_parity, "syncs": check_syncs, "reroute_syncs": check_reroute_syncs,
                  "graphs": check_graphs}
        checks = {name: check for name, check in checks.items() if name in args.only}
        for name, check in checks.items() if model_dir is not None and store is not None else ():
            print(f"gpu_check: {name} ...", flush=True)
            try:
                report["checks"][name] = check(model_dir, store, args.device, args.step)
            except Exception as e:  # one failing check still leaves the others' results
                report["checks"][name] = {"passed": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    if not args.no_bench and "bench" in args.only:
        print("gpu_check: bench ...", flush=True)
        report["checks"]["bench"] = run_bench(args.out, args.device)
    report["failed"] = [n for n, r in report["checks"].items() if not r.get("passed")]
    report["passed"] = not report["failed"]
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu_check: report in {args.out / 'gpu_check.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
