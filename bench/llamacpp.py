"""llama.cpp beside the engine, when `llama-cpp-python` is importable.

The same random GPT-2 the decode section runs is written to GGUF twice (f16 and q8_0, by
`bench.gguf`), and llama.cpp decodes the same number of tokens greedily at batch 1 and with 8
parallel sequences (what `llama-server --parallel 8` does: one batched decode per step over 8
sequence ids). The ratios put the engine's routed step (float and int8) against it in the same
run. Without the package the section says it skipped; docs/performance.md has the recipe to
build it on these machines.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np

from bench.common import BenchConfig, log, ratio

SKIP = ("llama-cpp-python is not importable; build it as docs/performance.md describes "
        "(`CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python`, ~15-20 min on 2 cores)")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _decode(ctx, n_vocab: int, prompt: list[int], new_tokens: int, parallel: int) -> float:
    """Seconds for `parallel` sequences of `prompt` + `new_tokens` greedy tokens, one batched
    `llama_decode` per step (llama-server's slots), the prompt evaluated first."""
    import llama_cpp

    n = len(prompt)
    batch = llama_cpp.llama_batch_init(n * parallel, 0, 1)
    try:
        _clear(ctx)
        start = time.perf_counter()
        # every sequence evaluates its own copy of the prompt, as llama-server's slots do and as
        # the engine prefills its rows (llama.cpp's per-sequence KV cache keeps a token in one)
        for s in range(parallel):
            for i, tok in enumerate(prompt):
                j = s * n + i
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, i, 1
                batch.seq_id[j][0], batch.logits[j] = s, i == n - 1
        batch.n_tokens = n * parallel
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        tokens = [_argmax(llama_cpp.llama_get_logits_ith(ctx, s * n + n - 1), n_vocab) for s in range(parallel)]
        for step in range(1, new_tokens):
            batch.n_tokens = parallel
            for s in range(parallel):
                batch.token[s], batch.pos[s], batch.n_seq_id[s] = tokens[s], n + step - 1, 1
                batch.seq_id[s][0], batch.logits[s] = s, True
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            tokens = [_argmax(llama_cpp.llama_get_logits_ith(ctx, s), n_vocab) for s in range(parallel)]
        return time.perf_counter() - start
    finally:
        llama_cpp.llama_batch_free(batch)


def _context(model, cfg: BenchConfig):
    """A context of 8 sequences (llama-server's `--parallel 8` slots) on the loaded model: the
    high-level `Llama` makes a one-sequence context and takes no `n_seq_max`. llama.cpp splits
    `n_ctx` among the sequences, and every slot evaluates its own prompt in one batch."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_seq_max = 8
    params.n_ctx = 8 * (cfg.prompt_tokens + cfg.new_tokens + 8)
    params.n_batch = params.n_ubatch = max(512, 8 * cfg.prompt_tokens)
    params.n_threads = params.n_threads_batch = cfg.threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not make an 8-sequence context")
    return ctx


def _clear(ctx) -> None:
    """Empty the context's KV cache (every sequence), so each run starts at position 0: the
    memory API of llama.cpp since mid-2025 (`llama_memory_clear`), else the older call."""
    import llama_cpp

    if hasattr(llama_cpp, "llama_memory_clear"):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    else:
        llama_cpp.llama_kv_self_clear(ctx)


def _argmax(row, n_vocab: int) -> int:
    """Greedy pick over llama.cpp's logits row (a float pointer), in numpy: a Python `max` over
    50,257 entries cost ~10 ms a row, which would have been charged to llama.cpp."""
    return int(np.ctypeslib.as_array(row, shape=(n_vocab,)).argmax())


def run(cfg: BenchConfig, assets, decode: dict) -> dict:
    if not available():
        log(f"llamacpp: skipped: {SKIP}")
        return {"skipped": SKIP}
    import llama_cpp
    from llama_cpp import Llama

    from bench import gguf

    out: dict = {}
    prompt = list(range(1, cfg.prompt_tokens + 1))
    for kind in ("f16", "q8_0"):
        path = Path(assets.root) / f"gpt2-{kind}.gguf"
        gguf.write_gpt2(assets.base, path, kind, *gguf.tokenizer_vocab(assets.tokenizer))
        llm = Llama(model_path=str(path), n_ctx=cfg.prompt_tokens + cfg.new_tokens + 8, n_threads=cfg.threads,
                    logits_all=False, verbose=False)
        ctx = _context(llm.model, cfg)
        try:
            runs = {}
            for parallel in (1, 8):
                _decode(ctx, llm.n_vocab(), prompt, 3, parallel)  # warm-up
                runs[parallel] = min(_decode(ctx, llm.n_vocab(), prompt, cfg.new_tokens, parallel)
                                     for _ in range(cfg.repeats))
        finally:
            llama_cpp.llama_free(ctx)
        for parallel, seconds in runs.items():
            tok_s = parallel * cfg.new_tokens / seconds
            out[f"{kind}_b{parallel}"] = {"tok_s": round(tok_s, 2), "seconds": round(seconds, 3)}
            log(f"llamacpp {kind} b{parallel}: {tok_s:.1f} tok/s")
        del llm
    for b in (1, 8):
        for key in ("engine_routed", "engine_routed_int8", "engine_routed_w8a8"):
            ours = decode.get(f"b{b}", {}).get(key, {}).get("tok_s")
            for kind in ("f16", "q8_0"):
                out.setdefault("ratios", {})[f"{key}_vs_{kind}_b{b}"] = ratio(ours, out[f"{kind}_b{b}"]["tok_s"])
    return out
