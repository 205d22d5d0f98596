"""The benchmark suite end to end on a tiny GPT-2 (`python -m bench --tiny`): every section runs
and the results have the documented shape. No timing is asserted (a project rule: timings
never decide the suite's pass/fail)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib", reason="the benchmark's plots need matplotlib (the `train` extra)")
pytest.importorskip("httpx", reason="the benchmark's HTTP clients need httpx (the `dev` extra)")


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory, torch_state_restored):
    from bench.__main__ import main

    out = tmp_path_factory.mktemp("bench")
    # one torch thread: on a shared CI machine two threads can be 50x slower, and speed is not tested here
    code = main(["--tiny", "--threads", "1", "--server", "thread", "--out", str(out)])
    return out, code


def test_runs_without_errors(bench_out):
    out, code = bench_out
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {}, results["errors"]
    assert code == 0


def test_results_json_has_the_documented_keys(bench_out):
    out, _ = bench_out
    results = json.loads((out / "results.json").read_text())
    ratios = results["ratios"]
    for key in ("routed_vs_hf_b1", "routed_vs_hf_b8", "http8_mixed_vs_peft_mixed8", "peft_remerge_vs_hf_b1"):
        assert key in ratios
    for key in ("routed_vs_hf_b1", "routed_vs_hf_b8", "peft_remerge_vs_hf_b1"):
        assert isinstance(ratios[key], float) and ratios[key] > 0
    # the tiny run has no 8-client level, so the HTTP ratio is absent (null), never invented
    assert ratios["http8_mixed_vs_peft_mixed8"] is None
    assert set(results["register_ms"]) == {"r8", "r16", "r64"}
    assert all(v > 0 for v in results["register_ms"].values())
    env = results["environment"]
    for key in ("device", "dtype", "torch", "transformers", "peft", "cpu_count", "torch_threads"):
        assert key in env
    assert env["torch_threads"] == 1
    assert results["meta"]["tiny"] is True and results["meta"]["notes"]


def test_sections_have_their_figures(bench_out):
    out, _ = bench_out
    results = json.loads((out / "results.json").read_text())
    decode = results["decode"]
    for batch in ("b1", "b8"):
        for method in ("hf_generate", "peft_single", "peft_mixed4", "peft_remerge", "engine_fixed", "engine_routed"):
            stats = decode[batch][method]
            assert stats["tok_s"] > 0 and stats["ms_per_step"] >= 0 and stats["ttft_ms"] > 0
    assert decode["b1"]["engine_routed"]["reroutes"] > 0  # it really re-routed
    # the floor: a bandwidth measured in this run, a floor per method, each step as a multiple of it
    bw = decode["bandwidth"]
    assert bw["gb_s"] == max(bw["copy_gb_s"], bw["matvec_gb_s"]) > 0
    for batch in ("b1", "b8"):
        blk = decode[batch]
        for method in ("hf_generate", "engine_fixed", "engine_routed"):
            x = blk[method]
            assert x["floor_ms"] > 0 and x["vs_floor"] == round(x["ms_per_step"] / x["floor_ms"], 2)
            assert len(x["all_tok_s"]) == decode["repeats"] and x["spread_pct"] >= 0
        # reading 4 adapters' factors costs more bytes than reading one
        assert blk["engine_routed"]["floor_ms"] > blk["engine_fixed"]["floor_ms"]
        # HF generate: measured in fp32 and, where the CPU computes it, bf16; the faster one is the baseline
        from server.engine.cpu_linear import native_bf16

        variants = blk["hf_variants"]
        assert set(variants) == ({"float32", "bfloat16"} if native_bf16() else {"float32"})
        assert blk["hf_generate"]["seconds"] == min(v["seconds"] for v in variants.values())
    assert results["ratios"]["routed_vs_floor_b1"] == decode["b1"]["engine_routed"]["vs_floor"]
    grammar = results["grammar"]  # the mask's share of a free step, per batch, also as ratios keys
    for b in (1, 8):
        share = grammar[f"b{b}"]["mask_share"]
        assert share is not None and share > 0
        assert grammar["ratios"][f"mask_share_b{b}"] == results["ratios"][f"grammar_mask_share_b{b}"] == share
    assert decode["b8"]["peft_remerge"]["merges"] > 0
    serving = results["serving"]
    for level in serving["levels"].values():
        assert level["errors"] == [] and level["tokens"] > 0
        assert level["ttft_ms"]["p50"] > 0 and level["itl_ms"]["p99"] >= level["itl_ms"]["p50"]
    assert serving["routed"]["tokens"] > 0
    assert serving["admin_register"]["register_ms_p50"] > 0
    lifecycle = results["lifecycle"]
    for rank in ("r8", "r16", "r64"):
        assert lifecycle["peft"][rank]["load_adapter_ms"] > 0
        assert lifecycle["engine"][rank]["unload_ms"] >= 0
    assert lifecycle["memory"]["engine"]["held_bytes_per_adapter"] > 0
    assert set(lifecycle["resident"]["fixed"]) == {"1", "4"}
    router = results["router"]
    for key in ("centroid_base", "centroid_base_service", "mlp"):
        assert router[key]["ms_p50"] > 0
    assert "skipped" in router["centroid_minilm"]  # not loaded in tiny mode, and says so


def test_markdown_and_plots_are_written(bench_out):
    out, _ = bench_out
    md = (out / "results.md").read_text()
    assert "## Ratios" in md and "routed_vs_hf_b1" in md and "## Serving" in md
    for name in ("throughput_vs_concurrency.png", "latency_cdf.png", "decode_vs_hf.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_int8_rows_quality_and_llamacpp(bench_out):
    out, _ = bench_out
    results = json.loads((out / "results.json").read_text())
    ratios = results["ratios"]
    for q in ("int8", "w8a8"):
        for key in (f"routed_{q}_vs_hf_b1", f"routed_{q}_vs_hf_b8", f"routed_{q}_vs_floor16_b1", f"{q}_ppl_ratio"):
            assert isinstance(ratios[key], float) and ratios[key] > 0, key
        for batch in ("b1", "b8"):
            x = results["decode"][batch][f"engine_routed_{q}"]
            assert x["tok_s"] > 0
            # int8 weights: its own floor is below the same step's 16-bit floor
            assert 0 < x["floor_ms"] < x["floor16_ms"]
    q = results["quality"]
    assert q["int8_ppl_ratio"] == ratios["int8_ppl_ratio"] and q["float_ppl"] > 0 and 0 <= q["greedy_agreement"] <= 1
    assert q["w8a8_ppl_ratio"] == ratios["w8a8_ppl_ratio"] and 0 <= q["greedy_agreement_w8a8"] <= 1
    hf = results["decode"]["b1"]["hf_generate"]  # the TTFT comes from inside the timed generate
    assert 0 < hf["ttft_ms"] < 1000 * hf["seconds"]
    assert "skipped" in results["llamacpp"] or "ratios" in results["llamacpp"]


def test_minimal_step_measures_its_steps_against_the_floor(torch_state_restored):
    """`python -m bench.minimal_step` on the tiny GPT-2: per batch a positive 16-bit floor and a
    median and one figure per repeat for each step, the native kernel's where it builds (never a
    timing bound)."""
    from bench.common import BenchConfig
    from bench.minimal_step import measure
    from server.engine.quant import w8a8_works
    from server.kernels import native

    if not w8a8_works("cpu"):
        pytest.skip("fbgemm's int8 GEMM is not in this torch build")
    result = measure(BenchConfig.make(tiny=True, device="cpu", threads=1), [1, 3], repeats=2)
    assert sorted(result) == [1, 3]
    for r in result.values():
        assert r["floor16_ms"] > 0 and r["gb_s"] > 0
        steps = {"min_fbgemm_only", "min_w8a8_rowscaled", "engine_routed_w8a8_fbgemm"}
        if native.load() is not None:
            steps |= {"min_native_int8", "min_native_w8a8", "engine_routed_w8a8", "engine_routed_int8"}
        assert set(r["ms"]) == steps
        for name, ms in r["ms"].items():
            assert len(r["repeats"][name]) == 2 and ms > 0
