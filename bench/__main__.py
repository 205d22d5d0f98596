"""`python -m bench [--quick] [--out DIR]`: run the benchmarks, print the ratios, write
DIR/results.json, DIR/results.md and PNG plots.

Sections: decode (HF generate, PEFT, the engine), serving (HTTP, concurrent streaming clients),
lifecycle (register/unload, memory, resident adapters), router (latency per call). Every figure
is compared with a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

SECTIONS = ("decode", "serving", "lifecycle", "router", "grammar", "quality", "llamacpp")
OPTIONAL = ("many-adapters",)  # run only when named in --only (writes a store of N adapters per N)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (32 new tokens, fewer repeats); ~6 min on 2 CPU cores")
    p.add_argument("--tiny", action="store_true", help="a 2-layer GPT-2: checks the benchmark code in seconds (numbers meaningless)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder (default bench/results)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the engine's and PEFT's dtype (default auto, as `switchboard serve`); HF generate runs in "
                        "each dtype the device computes well and the faster one is the baseline")
    p.add_argument("--compile", action="store_true",
                   help="also decode with the engine's static-shape step, eager and torch.compile'd (compiling "
                        "GPT-2 124M takes minutes on 2 CPU cores; the warm-up time is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections of {', '.join(SECTIONS + OPTIONAL)} (default: all but {', '.join(OPTIONAL)})")
    p.add_argument("--adapters-n", default="0,100",
                   help="many-adapters: comma-separated store sizes N (0 = the base model alone, the baseline)")
    p.add_argument("--adapters-1000", action="store_true", help="many-adapters: also N = 1000 (writes ~6.5 GB, deleted after)")
    p.add_argument("--adapters-rank", type=int, default=16, help="many-adapters: the adapters' rank (default 16)")
    p.add_argument("--server", choices=("subprocess", "thread"), default=None,
                   help="how the HTTP benchmark runs the server (default: subprocess; thread with --tiny)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bench import common, rig

    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS) - set(OPTIONAL)
    if unknown:
        raise SystemExit(f"unknown sections: {sorted(unknown)}")
    cfg = common.BenchConfig.make(quick=args.quick, tiny=args.tiny, device=args.device, threads=args.threads,
                                  sections=sections, dtype=args.dtype, compile=args.compile)
    common.setup_torch(cfg.threads)
    started = time.time()
    results: dict = {"environment": common.environment(cfg), "errors": {}, "timings_s": {}}
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmp:
        t = time.perf_counter()
        assets = rig.Assets(cfg, Path(tmp))
        results["timings_s"]["setup"] = round(time.perf_counter() - t, 1)
        common.log(f"setup done in {results['timings_s']['setup']} s (device {cfg.device}, {cfg.threads} threads)")
        for name in SECTIONS + OPTIONAL:
            if name not in sections:
                continue
            t = time.perf_counter()
            try:
                if name == "decode":
                    from bench import decode

                    results["decode"] = decode.run(cfg, assets)
                elif name == "serving":
                    from bench import serving

                    mixed8 = results.get("decode", {}).get("b8", {}).get("peft_mixed4", {}).get("tok_s")
                    mode = args.server or ("thread" if cfg.tiny else "subprocess")
                    results["serving"] = serving.run(cfg, assets, mode=mode, peft_mixed8_tok_s=mixed8)
                elif name == "lifecycle":
                    from bench import lifecycle

                    results["lifecycle"] = lifecycle.run(cfg, assets)
                elif name == "grammar":
                    from bench import grammar

                    results["grammar"] = grammar.run(cfg, assets)
                elif name == "router":
                    from bench import router

                    step = results.get("decode", {}).get("b1", {}).get("engine_routed", {}).get("ms_per_step")
                    results["router"] = router.run(cfg, assets, step_ms=step)
                elif name == "many-adapters":
                    from bench import many_adapters

                    counts = tuple(int(x) for x in args.adapters_n.split(",") if x.strip())
                    counts += (1000,) if args.adapters_1000 else ()
                    results["many_adapters"] = many_adapters.run(cfg, assets, counts, rank=args.adapters_rank)
                elif name == "quality":
                    from bench import quality

                    results["quality"] = quality.run(cfg)
                elif name == "llamacpp":
                    from bench import llamacpp

                    results["llamacpp"] = llamacpp.run(cfg, assets, results.get("decode", {}))
            except Exception as e:  # noqa: BLE001 - one failed section must not hide the others
                traceback.print_exc()
                results["errors"][name] = f"{type(e).__name__}: {e}"
            results["timings_s"][name] = round(time.perf_counter() - t, 1)
            common.log(f"{name} done in {results['timings_s'][name]} s")
    return finish(results, cfg, started)


def finish(results: dict, cfg, started: float) -> dict:
    from bench import report

    env = results["environment"]
    try:
        env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    notes = list(cfg.notes)
    load = max(env.get("load_average_at_start", [0])[0], env.get("load_average_at_end", [0])[0])
    if env.get("cpu_count") and load > env["cpu_count"]:
        notes.append(f"the machine was shared (load average {load} on {env['cpu_count']} CPUs): absolute numbers are "
                     "noisy; ratios come from interleaved repeats (the median of each) in the same run")
    lc = results.get("lifecycle", {}).get("engine", {})
    results["meta"] = {
        "quick": cfg.quick, "tiny": cfg.tiny, "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
        "adapter_rank": results.get("decode", {}).get("adapter_rank"), "sections": list(cfg.sections),
        "notes": notes, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "elapsed_s": round(time.time() - started, 1),
    }
    results["register_ms"] = {k: v["register_ms"] for k, v in lc.items()}
    results["unload_ms"] = {k: v["unload_ms"] for k, v in lc.items()}
    results["ratios"] = report.compute_ratios(results)
    results["targets"] = report.targets(results)
    return results


def write(results: dict, out: Path) -> list[Path]:
    from bench import plots, report

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    written = [out / "results.json", out / "results.md"]
    try:
        written += [out / name for name in plots.plots(results, out)]
    except Exception as e:  # noqa: BLE001 - plots are a bonus: keep the numbers
        results["errors"]["plots"] = f"{type(e).__name__}: {e}"
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    try:
        results = run(args)
    finally:  # give back the process-wide torch state (main() is also called from tests)
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
    written = write(results, args.out)
    from bench.report import ratios_table

    print()
    print(ratios_table(results))
    for t in results["targets"]:
        print(f"- {t['target']}: {t['value']} ({'met' if t['met'] else 'NOT met' if t['met'] is False else 'n/a'}"
              f"{', ' + t['gap'] if t['gap'] else ''})")
    for n in results["meta"]["notes"]:
        print(f"note: {n}")
    print(f"wrote {', '.join(str(p) for p in written)} in {results['meta']['elapsed_s']:.0f} s")
    if results["errors"]:
        print(f"errors: {results['errors']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
