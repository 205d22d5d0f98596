"""What structured output costs per decode step: the engine decoding a batch of free rows and the
same batch with every row under a JSON-schema grammar, interleaved, at batch 1 and 8.

Per step the constrained run fills each row's token bitmask (xgrammar) and masks its logits
before sampling (`server.engine.grammar.mask_rows`, timed here by wrapping it). Reported: the
median step of each run over the steps where every row was still running, the mask's own time
per step, and both as a share of the free step (target: mask ≤ 10 %). The shares are also under
`grammar.ratios` (`mask_share_b1`, `mask_share_b8`, `constrained_vs_free_step_b*`) and in the
run's top-level `ratios` as `grammar_mask_share_b1` / `_b8`.

The mask's cost grows with the vocabulary, so the grammar sees a GPT-2-sized one: the bench's
byte-level BPE trained on the suite's sample text (tests/data) up to what that text gives
(about 21k tokens), then topped up to GPT-2's 50257 with tokens made by joining two existing ones,
as BPE merges do. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench.common import BenchConfig, log, random_prompts

SCHEMA = {"type": "object", "properties": {
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "qty": {"type": "integer"}, "ok": {"type": "boolean"},
        "kind": {"enum": ["tool", "food", "book"]}}, "required": ["name", "qty", "ok", "kind"]}}},
    "required": ["items"]}
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def gpt2_sized_vocab(vocab_size: int, tiny: bool) -> list[str]:
    """Byte-level token strings (GPT-2's byte-to-unicode alphabet), `vocab_size` of them, id 0 = EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = sorted(str(p) for p in DATA.rglob("*") if p.suffix in (".txt", ".json", ".jsonl"))
    tok.train(files[:2] if tiny else files, trainer)
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    vocab = [s for s, _ in by_id]
    seen, rng = set(vocab), random.Random(0)
    while len(vocab) < vocab_size:
        s = rng.choice(vocab[257:]) + rng.choice(vocab[257:])
        if s not in seen:
            seen.add(s)
            vocab.append(s)
    return vocab[:vocab_size]


def _decode_steps(rig, prompts: torch.Tensor, new_tokens: int, compiled, timer: dict) -> dict:
    """Step the engine over one batch (constrained when `compiled`); per-step wall and mask time
    over the steps where every row was running."""
    from server.engine.grammar import RowGrammar
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import RoutingSpec, Sequence

    engine, registry = rig.engine, rig.registry
    seqs = []
    for row in prompts.tolist():
        versions = registry.acquire(["a0"])
        seq = Sequence(prompt_ids=row, max_tokens=new_tokens, sampling=SamplingParams(temperature=1.0, seed=len(seqs)),
                       routing=RoutingSpec("fixed", {"a0": 1.0}), decode=lambda t: "", emit=lambda ev: None,
                       eos_token_id=None, versions={v.name: v for v in versions})
        seq.grammar = RowGrammar(compiled) if compiled is not None else None
        seqs.append(seq)
    for s in seqs:
        engine.submit(s)
    engine.step()  # admission + prefill: not a decode step
    steps, masks = [], []
    while engine.has_work():
        full = len(engine.running) == len(seqs)
        timer["s"] = 0.0
        t = time.perf_counter()
        engine.step()
        if full:
            steps.append(time.perf_counter() - t)
            masks.append(timer["s"])
    return {"steps": len(steps), "step_ms": 1000 * statistics.median(steps) if steps else None,
            "mask_ms": 1000 * statistics.median(masks) if masks else None}


def run(cfg: BenchConfig, assets) -> dict:
    import xgrammar as xgr

    from server.engine import tokens
    from server.engine.grammar import GrammarCompiler, json_schema_spec

    vocab = assets.base.config.vocab_size
    t = time.perf_counter()
    strings = gpt2_sized_vocab(vocab, cfg.tiny)
    info = xgr.TokenizerInfo(strings, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=[0])
    compiler = GrammarCompiler(info)
    compiled = compiler.compile(json_schema_spec(SCHEMA, "bench"))
    setup_s = time.perf_counter() - t
    rig = assets.engine_rig()
    timer = {"s": 0.0}
    original = tokens.mask_rows

    def timed(logits, grammars):
        t0 = time.perf_counter()
        out = original(logits, grammars)
        timer["s"] += time.perf_counter() - t0
        return out

    tokens.mask_rows = timed  # type: ignore[assignment]
    out: dict = {"schema": json.dumps(SCHEMA), "vocab": vocab, "setup_s": round(setup_s, 1),
                 "engine": "xgrammar " + importlib.metadata.version("xgrammar")}
    try:
        for batch in cfg.batches:
            prompts = random_prompts(cfg, batch, vocab, seed=batch)
            _decode_steps(rig, prompts, 4, compiled, timer)  # warm up both paths
            _decode_steps(rig, prompts, 4, None, timer)
            runs: dict[str, list[dict]] = {"free": [], "constrained": []}
            for _ in range(cfg.repeats):
                runs["free"].append(_decode_steps(rig, prompts, cfg.new_tokens, None, timer))
                runs["constrained"].append(_decode_steps(rig, prompts, cfg.new_tokens, compiled, timer))
            free = statistics.median(r["step_ms"] for r in runs["free"] if r["step_ms"])
            held = [r for r in runs["constrained"] if r["step_ms"]]
            step = statistics.median(r["step_ms"] for r in held) if held else None
            mask = statistics.median(r["mask_ms"] for r in held) if held else None
            out[f"b{batch}"] = {
                "free_step_ms": round(free, 3), "constrained_step_ms": round(step, 3) if step else None,
                "mask_ms": round(mask, 3) if mask is not None else None,
                "mask_share": round(mask / free, 4) if mask is not None else None,
                "step_ratio": round(step / free, 3) if step else None,
                "constrained_steps_measured": [r["steps"] for r in runs["constrained"]]}
            ratios = out.setdefault("ratios", {})  # the keys the top-level `ratios` copies (bench/report.py)
            ratios[f"mask_share_b{batch}"] = out[f"b{batch}"]["mask_share"]
            ratios[f"constrained_vs_free_step_b{batch}"] = out[f"b{batch}"]["step_ratio"]
            log(f"grammar b{batch}: {out[f'b{batch}']}")
    finally:
        tokens.mask_rows = original  # type: ignore[assignment]
    return out
