"""Ratios, the issues' targets and the Markdown report from one run's results (the PNG plots: `bench.plots`)."""

from __future__ import annotations

from bench.common import ratio
from bench.decode import LABELS, METHODS, STEP_KINDS


def _quant_docs(q: str, kind: str) -> dict[str, str]:
    """What each of `_quant_ratios`' keys means, for `--quant q`."""
    return {
        f"routed_{q}_vs_hf_b1": f"engine routed with --quant {q} ({kind}) tok/s ÷ HF generate tok/s (its faster dtype), "
                                "batch 1",
        f"routed_{q}_vs_hf_b8": "the same at batch 8",
        f"routed_{q}_vs_floor16_b1": f"engine routed {q} ms per step ÷ the floor of the same step with 16-bit weights, "
                                     "batch 1 (< 1: faster than any 16-bit engine can be)",
        f"routed_{q}_vs_floor_b1": f"engine routed {q} ms per step ÷ its own (int8) floor, batch 1",
        f"routed_{q}_vs_routed_b1": f"engine routed {q} tok/s ÷ engine routed in the float dtype tok/s, batch 1",
        f"routed_{q}_vs_routed_b8": "the same at batch 8",
        f"{q}_ppl_ratio": f"held-out perplexity under --quant {q} ÷ float, small GPT-2 trained on the starter data "
                          "(quality section)",
    }


RATIO_DOC = {
    "routed_vs_hf_b1": "engine routed (4 adapters, re-route every 2) tok/s ÷ HF generate tok/s (its faster dtype), batch 1",
    "routed_vs_hf_b8": "the same at batch 8",
    "reroute2_vs_once_b1": "engine routed, re-route every 2 tok/s ÷ the same routed once on the prompt, batch 1 (base embedder)",
    "reroute2_vs_once_b8": "the same at batch 8",
    "distinct8_vs_one_n1000": "many-adapters, 1,000 in the store: 8 HTTP clients on 8 distinct adapters (a fresh draw per round, each served once untimed first: steady state) ÷ all 8 on one adapter, aggregate tok/s",
    "http8_vs_http1_sequential": "8 concurrent HTTP streaming clients, aggregate tok/s ÷ one client sending its requests one after another",
    "http8_mixed_vs_peft_mixed8": "8 concurrent HTTP streaming clients on mixed adapters, aggregate tok/s ÷ PEFT mixed batch of 8 (adapter_names) tok/s",
    "peft_remerge_vs_hf_b1": "PEFT mixture re-merged every 2 tokens (add_weighted_adapter cat) tok/s ÷ HF generate tok/s, batch 1",
    "peft_remerge_vs_hf_b8": "the same at batch 8 (one merged adapter per row, adapter_names)",
    "routed_vs_peft_remerge_b1": "engine routed ÷ PEFT re-merge, batch 1 (the same routed mixture both ways)",
    "routed_vs_peft_remerge_b8": "the same at batch 8",
    "fixed_vs_hf_b1": "engine with one fixed adapter ÷ HF generate (no adapter), batch 1",
    "fixed_vs_hf_b8": "the same at batch 8",
    "fixed_vs_peft_single_b1": "engine fixed adapter ÷ PEFT one adapter unmerged, batch 1",
    "routed_step_vs_hf_step_b1": "HF ms per decode step ÷ engine routed ms per decode step, batch 1 (prefill excluded)",
    "routed_step_vs_hf_step_b8": "the same at batch 8",
    "peft_load_vs_register_r16": "PEFT load_adapter ms ÷ engine register ms, r=16",
    "routed_vs_floor_b1": "engine routed ms per decode step ÷ the memory-bandwidth floor of that step, batch 1 (1.0 = at the floor)",
    "routed_vs_floor_b8": "the same at batch 8",
    "fixed_vs_floor_b1": "engine fixed adapter ms per decode step ÷ its floor, batch 1",
    "hf_vs_floor_b1": "HF generate ms per decode step ÷ its floor, batch 1",
    "routed_vs_fixed_step_b1": "engine routed ms per step ÷ engine fixed ms per step, batch 1 (the cost of routing over 4)",
    "compiled_vs_eager_step_b1": "engine routed ms per step, eager step ÷ compiled static step, batch 1 (> 1: compiling wins; --compile runs)",
    "compiled_vs_eager_step_b8": "the same at batch 8",
    "compiled_vs_floor_b1": "engine routed with the compiled static step, ms per step ÷ its floor, batch 1 (--compile runs)",
    **_quant_docs("int8", "int8 base weights"),
    **_quant_docs("w8a8", "int8 weights and activations"),
}


def _tok(decode: dict, batch: int, method: str) -> float | None:
    return decode.get(f"b{batch}", {}).get(method, {}).get("tok_s")


def _step(decode: dict, batch: int, method: str) -> float | None:
    return decode.get(f"b{batch}", {}).get(method, {}).get("ms_per_step")


def _floor(decode: dict, batch: int, method: str) -> float | None:
    return decode.get(f"b{batch}", {}).get(method, {}).get("vs_floor")


def compute_ratios(results: dict) -> dict:
    d = results.get("decode", {})
    s = results.get("serving", {})
    lc = results.get("lifecycle", {})
    eight = s.get("levels", {}).get("8", {})
    r16 = lc.get("engine", {}).get("r16", {})
    p16 = lc.get("peft", {}).get("r16", {})
    return {
        "routed_vs_hf_b1": ratio(_tok(d, 1, "engine_routed"), _tok(d, 1, "hf_generate")),
        "reroute2_vs_once_b1": ratio(_tok(d, 1, "engine_routed"), _tok(d, 1, "engine_routed_once")),
        "reroute2_vs_once_b8": ratio(_tok(d, 8, "engine_routed"), _tok(d, 8, "engine_routed_once")),
        "routed_vs_hf_b8": ratio(_tok(d, 8, "engine_routed"), _tok(d, 8, "hf_generate")),
        "http8_mixed_vs_peft_mixed8": ratio(eight.get("agg_tok_s"), _tok(d, 8, "peft_mixed4")),
        "http8_vs_http1_sequential": ratio(eight.get("agg_tok_s"), s.get("levels", {}).get("1", {}).get("agg_tok_s")),
        "peft_remerge_vs_hf_b1": ratio(_tok(d, 1, "peft_remerge"), _tok(d, 1, "hf_generate")),
        "peft_remerge_vs_hf_b8": ratio(_tok(d, 8, "peft_remerge"), _tok(d, 8, "hf_generate")),
        "routed_vs_peft_remerge_b1": ratio(_tok(d, 1, "engine_routed"), _tok(d, 1, "peft_remerge")),
        "routed_vs_peft_remerge_b8": ratio(_tok(d, 8, "engine_routed"), _tok(d, 8, "peft_remerge")),
        "fixed_vs_hf_b1": ratio(_tok(d, 1, "engine_fixed"), _tok(d, 1, "hf_generate")),
        "fixed_vs_hf_b8": ratio(_tok(d, 8, "engine_fixed"), _tok(d, 8, "hf_generate")),
        "fixed_vs_peft_single_b1": ratio(_tok(d, 1, "engine_fixed"), _tok(d, 1, "peft_single")),
        "routed_step_vs_hf_step_b1": ratio(_step(d, 1, "hf_generate"), _step(d, 1, "engine_routed")),
        "routed_step_vs_hf_step_b8": ratio(_step(d, 8, "hf_generate"), _step(d, 8, "engine_routed")),
        "peft_load_vs_register_r16": ratio(p16.get("load_adapter_ms"), r16.get("register_ms")),
        "routed_vs_floor_b1": _floor(d, 1, "engine_routed"),
        "routed_vs_floor_b8": _floor(d, 8, "engine_routed"),
        "fixed_vs_floor_b1": _floor(d, 1, "engine_fixed"),
        "hf_vs_floor_b1": _floor(d, 1, "hf_generate"),
        "routed_vs_fixed_step_b1": ratio(_step(d, 1, "engine_routed"), _step(d, 1, "engine_fixed")),
        "compiled_vs_eager_step_b1": ratio(_step(d, 1, "engine_routed"), _step(d, 1, "engine_routed_compiled")),
        "compiled_vs_eager_step_b8": ratio(_step(d, 8, "engine_routed"), _step(d, 8, "engine_routed_compiled")),
        **({"distinct8_vs_one_n1000": results["many_adapters"]["1000"].get("distinct8_vs_one")}
           if "1000" in results.get("many_adapters", {}) else {}),
        "compiled_vs_floor_b1": _floor(d, 1, "engine_routed_compiled"),
        **_quant_ratios(results, "int8"),
        **_quant_ratios(results, "w8a8"),
        # structured output: the grammar mask's ms per decode step ÷ the free step (target ≤ 0.10)
        "grammar_mask_share_b1": results.get("grammar", {}).get("ratios", {}).get("mask_share_b1"),
        "grammar_mask_share_b8": results.get("grammar", {}).get("ratios", {}).get("mask_share_b8"),
        "grammar_constrained_vs_free_step_b1":
            results.get("grammar", {}).get("ratios", {}).get("constrained_vs_free_step_b1"),
        "grammar_constrained_vs_free_step_b8":
            results.get("grammar", {}).get("ratios", {}).get("constrained_vs_free_step_b8"),
    }


def _quant_ratios(results: dict, q: str) -> dict:
    """Issue 22's ratios for the engine routed under `--quant q` (`engine_routed_{q}` rows)."""
    d, m = results.get("decode", {}), f"engine_routed_{q}"
    return {
        f"routed_{q}_vs_hf_b1": ratio(_tok(d, 1, m), _tok(d, 1, "hf_generate")),
        f"routed_{q}_vs_hf_b8": ratio(_tok(d, 8, m), _tok(d, 8, "hf_generate")),
        f"routed_{q}_vs_floor16_b1": d.get("b1", {}).get(m, {}).get("vs_floor16"),
        f"routed_{q}_vs_floor_b1": _floor(d, 1, m),
        f"routed_{q}_vs_routed_b1": ratio(_tok(d, 1, m), _tok(d, 1, "engine_routed")),
        f"routed_{q}_vs_routed_b8": ratio(_tok(d, 8, m), _tok(d, 8, "engine_routed")),
        f"{q}_ppl_ratio": results.get("quality", {}).get(f"{q}_ppl_ratio"),
    }


def _target(label: str, v, limit: float, higher: bool, gap) -> dict:
    """One "done when" line: met when `v` reaches `limit` (≥ when `higher`, else ≤); `gap(v)`
    words the miss. `v` None (the section did not run): met and gap are None."""
    met = None if v is None else (v >= limit if higher else v <= limit)
    return {"target": label, "value": v, "met": met, "gap": None if met in (None, True) else gap(v)}


def targets(results: dict) -> list[dict]:
    r = results["ratios"]
    out = [_target(f"engine routed ≥ 1.0× HF generate, batch {b}", r.get(f"routed_vs_hf_b{b}"), 1.0, True,
                   lambda v: f"{(1 - v) * 100:.0f} % slower") for b in (1, 8)]
    out.append(_target("engine routed ms/step ≤ 1.5× the bandwidth floor, batch 1", r.get("routed_vs_floor_b1"),
                       1.5, False, lambda v: f"{v / 1.5:.2f}× too slow"))
    out.append(_target("register latency r=16 ≤ 20 ms", results.get("register_ms", {}).get("r16"), 20.0, False,
                       lambda v: f"{v - 20:.1f} ms over"))
    n1000 = results.get("many_adapters", {}).get("1000")
    if n1000:  # issue 26's "done when", with 1,000 adapters in the store
        for label, key, limit, unit, higher in (
                ("/ready ≤ 5 s after the base model's own start (N=1000)", "ready_over_base_s", 5.0, "s", False),
                ("RSS at ready ≤ base + 1 GB (N=1000)", "rss_over_base_mb", 1024.0, "MB", False),
                ("register ≤ 20 ms (N=1000)", "register_ms_p50", 20.0, "ms", False),
                ("8 distinct adapters ≥ 0.9× one adapter's tok/s (N=1000)", "distinct8_vs_one", 0.9, "×", True)):
            out.append(_target(label, n1000.get(key), limit, higher,
                               lambda v, limit=limit, unit=unit, higher=higher:
                               f"{abs(v - limit):.2f} {unit} {'short' if higher else 'over'}"))
    for q in ("int8", "w8a8"):  # issue 22's targets, for each kind of int8 base weights
        out += [_target(f"engine routed {q} ≥ 2.0× HF generate, batch {b}", r.get(f"routed_{q}_vs_hf_b{b}"), 2.0,
                        True, lambda v: f"{v / 2.0:.2f}× of the target") for b in (1, 8)]
        out.append(_target(f"engine routed {q} ms/step ≤ 1.0× the 16-bit floor, batch 1",
                           r.get(f"routed_{q}_vs_floor16_b1"), 1.0, False, lambda v: f"{v:.2f}× too slow"))
        out.append(_target(f"{q} ÷ float held-out perplexity ≤ 1.01", r.get(f"{q}_ppl_ratio"), 1.01, False,
                           lambda v: f"{(v - 1) * 100:.2f} % worse"))
    return out


# -- Markdown ------------------------------------------------------------------------------------------------
def _f(x, nd: int = 2, suffix: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}{suffix}"
    return f"{x}{suffix}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def ratios_table(results: dict) -> str:
    rows = [[f"`{k}`", f"**{_f(v, 2)}×**" if v is not None else "–", RATIO_DOC.get(k, "")]
            for k, v in results["ratios"].items()]
    return "\n".join(_table(["ratio", "value", "what"], rows))


def markdown(results: dict) -> str:
    env, meta = results["environment"], results["meta"]
    lines = ["# Switchboard benchmark", ""]
    lines.append(f"`python -m bench{' --quick' if meta['quick'] else ''}{' --tiny' if meta['tiny'] else ''}` · "
                 f"{meta['finished']} · {meta['elapsed_s']:.0f} s")
    lines.append("")
    lines.append(f"Device **{env['device']}** ({env.get('device_name', '')}), dtype {env['dtype']}, "
                 f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
                 f"Python {env['python']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads; "
                 f"load average at start/end {env.get('load_average_at_start')} / {env.get('load_average_at_end')}; "
                 f"commit {env.get('git_commit', '?')}{' with uncommitted server/router_core changes' if env.get('git_dirty_engine') else ''}.")
    lines.append("")
    lines.append(f"Model: GPT-2 124M shape (`GPT2Config()`, random weights); prompt {meta['prompt_tokens']} tokens, "
                 f"{meta['new_tokens']} new tokens, greedy; adapters LoRA r={meta.get('adapter_rank')} on "
                 f"c_attn, c_proj. Every ratio divides two figures measured in this run.")
    lines.append("")
    for n in meta.get("notes", []):
        lines.append(f"- {n}")
    lines.append("")
    lines += ["## Ratios", "", ratios_table(results)]
    lines += ["## Targets", ""]
    lines += _table(["target", "value", "met", "gap"],
                    [[t["target"], _f(t["value"]), {True: "yes", False: "**no**", None: "–"}[t["met"]], t["gap"] or ""]
                     for t in results.get("targets", [])])
    d = results.get("decode")
    many = results.get("many_adapters", {})
    if many:
        lines += ["## Many adapters", "", "A store of N adapters under `switchboard serve` (subprocess); the N = 0 row is the "
                  "base model alone, this run's baseline.", ""]
        lines += _table(["N", "rank", "start → /ready s", "over base s", "RSS at ready MB", "over base MB", "register ms p50",
                         "one adapter tok/s", "8 distinct tok/s", "distinct ÷ one", "SIGTERM exit"],
                        [[n, r.get("rank"), _f(r.get("start_to_ready_s")), _f(r.get("ready_over_base_s")), _f(r.get("rss_mb"), 0),
                          _f(r.get("rss_over_base_mb"), 0), _f(r.get("register_ms_p50"), 1), _f(r.get("one_tok_s")),
                          _f(r.get("distinct8_tok_s")), _f(r.get("distinct8_vs_one")), r.get("sigterm_exit")]
                         for n, r in many.items()])
    if d:
        lines += ["## Decode", ""]
        for b in (1, 8):
            blk = d.get(f"b{b}")
            if not blk:
                continue
            hf = blk["hf_generate"]
            rows = []
            for m in (*METHODS, *(k for k in STEP_KINDS if k in blk)):
                x = blk[m]
                note = " (extrapolated)" if x.get("extrapolated") else ""
                label = LABELS[m] + (f": {x['dtype']}" if "dtype" in x else "")
                if "vs_floor16" in x:
                    note += f" (× 16-bit floor {_f(x['vs_floor16'])})"
                rows.append([label + note, _f(x["tok_s"], 1), f"± {_f(x.get('spread_pct'), 0)} %",
                             f"{_f(ratio(x['tok_s'], hf['tok_s']))}×", _f(x["ms_per_step"], 1),
                             _f(x.get("floor_ms"), 1), f"{_f(x.get('vs_floor'))}×", _f(x["ttft_ms"], 1)])
            variants = ", ".join(f"{k} {_f(v['tok_s'], 1)} tok/s" for k, v in blk.get("hf_variants", {}).items())
            lines += [f"Batch {b} (median of {d.get('repeats')} interleaved repeats; spread = (max − min) ÷ median "
                      f"tok/s; HF generate measured as {variants}):", ""]
            lines += _table(["method", "tok/s", "spread", "× HF", "ms/step", "floor ms", "× floor", "TTFT ms"], rows)
            per = blk.get("routed_vs_hf_per_repeat")
            if per:
                lines += [f"Engine routed ÷ HF within each repeat: {', '.join(_f(v) for v in per)}.", ""]
        if d.get("step_warm_up_s"):
            lines += [f"Static decode step warm-up before serving (compile included): "
                      f"{', '.join(f'{k} {v} s' for k, v in d['step_warm_up_s'].items())}; graphs compiled after "
                      f"the warm-up, during all decode runs: {d.get('recompiles_after_warm_up')}.", ""]
        bw = d.get("bandwidth")
        if bw:
            lines += [f"Floor = bytes read per decode step (weights incl. the tied LM head, the active LoRA factors, "
                      f"the rows' cached K/V at the mean position) ÷ memory bandwidth {bw['gb_s']} GB/s, measured in "
                      f"this run ({bw['method']}: copy {bw['copy_gb_s']}, linear {bw['matvec_gb_s']} GB/s; the best of "
                      f"{len(bw.get('all_gb_s', [1]))} measurements spread over the run: {bw.get('all_gb_s')}). "
                      f"Engine and PEFT run in {d.get('dtype')}.", ""]
        rm = d.get("b1", {}).get("peft_remerge", {})
        if rm.get("merge_ms_per_call") is not None:
            lines += [f"PEFT `add_weighted_adapter(cat)`: {rm['merge_ms_per_call']} ms per call (batch 1).", ""]
    q = results.get("quality")
    if q:
        lines += ["## Quality of --quant int8 and w8a8", "",
                  f"A GPT-2 {q['model']} trained from scratch on the starter data for {q['training']['steps']} steps "
                  f"({q['training']['seconds']} s, final train loss {q['training']['final_train_loss']}); held-out "
                  f"perplexity over {q['held_out_tokens']} tokens: float {q['float_ppl']}, int8 {q['int8_ppl']} "
                  f"(ratio {q['int8_ppl_ratio']}), w8a8 {q.get('w8a8_ppl')} (ratio {q.get('w8a8_ppl_ratio')}); "
                  f"greedy agreement with float (tokens before the first difference, "
                  f"{q['greedy_rows']} rows × {q['greedy_new_tokens']} tokens): int8 {q['greedy_agreement']}, "
                  f"w8a8 {q.get('greedy_agreement_w8a8')}.", ""]
    s = results.get("serving")
    if s:
        lines += ["## Serving (HTTP, streaming, loopback)", ""]
        base = s.get("peft_mixed8_tok_s")
        rows = []
        for c, x in s.get("levels", {}).items():
            if not x.get("tokens"):
                rows.append([c, "–", "–", "–", "–", f"errors: {x.get('errors')}"])
                continue
            rows.append([c, _f(x["agg_tok_s"], 1), f"{_f(ratio(x['agg_tok_s'], base))}×",
                         f"{_f(x['ttft_ms']['p50'], 0)} / {_f(x['ttft_ms']['p99'], 0)}",
                         f"{_f(x['itl_ms']['p50'], 1)} / {_f(x['itl_ms']['p99'], 1)}",
                         ", ".join(x.get("errors", [])[:1])])
        lines += [f"Clients on adapters a0–a3 (client i → a(i mod 4)), {s['new_tokens']} new tokens each; "
                  f"server `{s['server']}`, started in {s['startup_s']} s. Baseline: PEFT mixed batch of 8, "
                  f"{_f(base, 1)} tok/s.", ""]
        lines += _table(["clients", "agg tok/s", "× PEFT mixed 8", "TTFT p50 / p99 ms", "inter-token p50 / p99 ms",
                         "errors"], rows)
        if s.get("routed", {}).get("tokens"):
            x = s["routed"]
            lines += [f"Routed (`model: auto`, re-route every 2), {x['clients']} clients: {x['agg_tok_s']} tok/s, "
                      f"TTFT p50 {x['ttft_ms']['p50']} ms, inter-token p50/p99 {x['itl_ms']['p50']}/{x['itl_ms']['p99']} ms.", ""]
        if s.get("replace_under_load"):
            u = s["replace_under_load"]
            lines += [f"Replacing `a0` (a new version under the same name) {u['replacements']} times while "
                      f"{u['clients']} clients stream: p50 {u['replace_ms']['p50']} ms, p99 {u['replace_ms']['p99']} ms; "
                      f"{len(u['errors'])} failed requests of {u['requests']}.", ""]
        if s.get("admin_register"):
            a = s["admin_register"]
            lines += [f"`POST /admin/adapters` ({a['path']}): {a['register_ms_p50']} ms p50; "
                      f"`DELETE`: {a['unload_ms_p50']} ms p50.", ""]
    lc = results.get("lifecycle")
    if lc:
        lines += ["## Adapter lifecycle", ""]
        rows = []
        for k, e in lc.get("engine", {}).items():
            p = lc.get("peft", {}).get(k, {})
            rows.append([k, _f(e["register_ms"]), f"{_f(e['read_validate_ms'])} / {_f(e['registry_ms'], 3)} / "
                         f"{_f(e['slot_install_ms'], 3)}", _f(e["unload_ms"], 3), _f(p.get("load_adapter_ms")),
                         _f(p.get("delete_adapter_ms")), f"{_f(e.get('vs_peft_load_adapter'))}×",
                         f"{e['param_bytes'] / 2**20:.2f}"])
        lines += _table(["rank", "register ms", "read+validate / registry / slot ms", "unload ms",
                         "PEFT load_adapter ms", "PEFT delete ms", "PEFT ÷ engine", "param MiB"], rows)
        m = lc.get("memory")
        if m:
            e, p, st = m["engine"], m["peft"], m.get("stacked_factor_cache", {})
            lines += [f"Memory per resident adapter ({m['adapter']}, {e['adapters']} copies): the engine holds "
                      f"{e['held_bytes_per_adapter'] / 2**20:.2f} MiB of tensors per adapter = {_f(e['held_vs_param'])}× "
                      f"its {e['param_bytes'] / 2**20:.2f} MiB of parameters ({e.get('note', '')}); PEFT holds "
                      f"{_f(p.get('held_vs_param'))}×. Stacked-factor cache after the decode runs: "
                      f"{st.get('bytes', 0) / 2**20:.2f} MiB = {_f(st.get('vs_routed_adapters'))}× the 4 routed "
                      f"adapters' parameters (up to {st.get('max_cached_sets_per_layer')} active sets cached per layer).", ""]
        r = lc.get("resident")
        if r:
            rows = [[n, _f(r["fixed"][n]["ms_per_step"], 1), f"{_f(r['fixed'][n]['vs_1'])}×",
                     _f(r["routed_top2"][n]["ms_per_step"], 1), f"{_f(r['routed_top2'][n]['vs_1'])}×"]
                    for n in r["fixed"]]
            lines += [f"Decode step with N adapters resident (batch {r['batch']}, {r['new_tokens']} new tokens; "
                      "speed × the 1-resident step, > 1 = faster):", ""]
            lines += _table(["resident", "fixed ms/step", "speed × 1 resident", "routed top-2 ms/step",
                             "speed × 1 resident"], rows)
            lines += ["", f"Fixed rows use adapter i mod N, so the batch uses min(N, {r['batch']}) distinct adapters: "
                      "a slower step at N ≥ 4 is the cost of more active adapters (their factors are read for "
                      "every row), not of residency; equal figures at 16 and 64 show residency itself is free."]
    ro = results.get("router")
    if ro:
        lines += ["## Router latency per call", ""]
        rows = []
        for k in ("centroid_base", "centroid_base_service", "centroid_minilm", "mlp", "mlp_with_complexity",
                  "complexity"):
            x = ro.get(k)
            if not x:
                continue
            if "skipped" in x:
                rows.append([k, "skipped", x["skipped"][:80], ""])
                continue
            extra = x.get("embedder") or (x.get("note") or ("parser" if x.get("parser") else ""))
            rows.append([k, _f(x["ms_p50"], 3), f"{_f(x.get('vs_decode_step'), 3)}", extra])
        lines += _table(["router", "ms p50", "÷ engine decode step (b1)", "note"], rows)
    g = results.get("grammar")
    if g:
        lines += ["## Structured output: grammar mask per decode step", "",
                  f"{g['engine']}, vocabulary {g['vocab']}, one JSON schema, every row constrained; steps where all rows run.", ""]
        rows = [[f"b{b}", _f(x.get("free_step_ms"), 3), _f(x.get("constrained_step_ms"), 3), _f(x.get("mask_ms"), 3),
                 _f(x.get("mask_share"), 4), _f(x.get("step_ratio"), 3)]
                for b, x in ((k[1:], v) for k, v in g.items() if k.startswith("b") and isinstance(v, dict))]
        lines += _table(["batch", "free step ms", "constrained step ms", "mask ms", "mask ÷ free step (target ≤ 0.10)",
                         "constrained ÷ free"], rows) + [""]
    if results.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()] + [""]
    lines += ["## Plots", "", "![throughput](throughput_vs_concurrency.png) ![latency](latency_cdf.png) "
              "![decode](decode_vs_hf.png)", ""]
    return "\n".join(lines)
