"""Quality of `--quant int8` and `--quant w8a8`, measured: perplexity on held-out text and greedy agreement, int8
against the float model, on a GPT-2 whose weights are not random.

The decode benchmarks use random weights (no model hub here), whose logits say nothing about
quantisation error on text. So this section trains a small GPT-2 from scratch on the starter
data shipped in `training/starter_data` (prose, code, math; the last tenth of each file held out),
for a fixed time budget, then scores the held-out text with the engine's forward twice: float,
and with the int8 base weights the engine serves under `--quant int8`. The int8 kernel path is
forced for the scoring (`Int8Linear.max_rows`), so the activations are rounded to bf16 exactly as
in a decode step; w8a8 quantises each row on its own, so a 128-token window scores as its
tokens would decode. Greedy agreement: the engine decodes the same held-out prompts greedily both
ways; the figure is the share of tokens before each row's first difference.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from bench.common import BenchConfig, log

DATA = Path(__file__).resolve().parent.parent / "training" / "starter_data"
HELD_OUT = 0.1  # last tenth of each file's records
CONTEXT = 128


def texts(split: str) -> list[str]:
    """Every record's string fields joined, per file, the first 90 % ("train") or the rest."""
    out = []
    for path in sorted(DATA.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        cut = int(len(records) * (1 - HELD_OUT))
        for r in records[:cut] if split == "train" else records[cut:]:
            out.append("\n".join(v for k, v in r.items() if isinstance(v, str) and k != "source"))
    return out


def train_tokenizer(corpus: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def token_stream(tokenizer, corpus: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in corpus:
        ids += tokenizer(t)["input_ids"] + [eos]
    return torch.tensor(ids)


def train(model, stream: torch.Tensor, seconds: float, max_steps: int, batch: int = 8, lr: float = 5e-3) -> dict:
    """AdamW on random windows of the training stream until `seconds` or `max_steps`."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    start, steps, loss = time.perf_counter(), 0, float("nan")
    while steps < max_steps and time.perf_counter() - start < seconds:
        idx = torch.randint(len(stream) - CONTEXT - 1, (batch,), generator=gen)
        x = torch.stack([stream[i:i + CONTEXT] for i in idx.tolist()])
        warm = min(1.0, (steps + 1) / 10)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss, steps = float(out.loss.detach()), steps + 1
    model.eval()
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "final_train_loss": round(loss, 3)}


def _engine(model, tokenizer, quant: str):
    from server.engine.base_model import resident_model
    from server.engine.engine import Engine, EngineConfig
    from server.engine.registry import AdapterRegistry

    resident = resident_model("quality-gpt2", model, tokenizer, torch.device("cpu"), torch.float32)
    resident.quant = quant
    return Engine(resident, AdapterRegistry(), EngineConfig(max_loras=1, max_batch_size=8))


@torch.inference_mode()
def perplexity(engine, stream: torch.Tensor, rows: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping CONTEXT windows of `stream`, through the
    engine's forward (int8 base weights when the engine quantised them)."""
    from server.engine import gpt2
    from server.engine.quant import Int8Linear

    n = (len(stream) - 1) // CONTEXT
    windows = stream[: n * CONTEXT + 1]
    nll, count = 0.0, 0
    saved = Int8Linear.max_rows
    Int8Linear.max_rows = 1 << 30  # the decode kernel, bf16 activations and all, for every row
    try:
        for s in range(0, n, rows):
            e = min(s + rows, n)
            x = torch.stack([windows[i * CONTEXT:(i + 1) * CONTEXT] for i in range(s, e)])
            y = torch.stack([windows[i * CONTEXT + 1:(i + 1) * CONTEXT + 1] for i in range(s, e)])
            engine.cache.reserve(e - s, CONTEXT)
            logits, _ = gpt2.forward(engine.resident.model, x, torch.arange(CONTEXT).expand(e - s, CONTEXT),
                                     engine.cache, all_logits=True)
            nll += float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                                           reduction="sum"))
            count += y.numel()
    finally:
        Int8Linear.max_rows = saved
    return math.exp(nll / count)


def greedy(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import RoutingSpec, Sequence

    seqs = [Sequence(prompt_ids=p, max_tokens=new_tokens, sampling=SamplingParams(temperature=0.0),
                     routing=RoutingSpec("fixed", {}), decode=lambda t: "", emit=lambda e: None, eos_token_id=None)
            for p in prompts]
    for s in seqs:
        engine.submit(s)
    while engine.has_work():
        engine.step()
    return [list(s.generated) for s in seqs]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of tokens before each row's first difference (1.0 = identical greedy outputs)."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        first = next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
        same, total = same + first, total + len(x)
    return round(same / max(total, 1), 3)


def run(cfg: BenchConfig) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    train_texts, held = texts("train"), texts("held_out")
    vocab = 512
    tokenizer = train_tokenizer(train_texts, vocab)
    stream, held_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, held)
    shape = dict(n_layer=2, n_head=2, n_embd=64) if cfg.tiny else dict(n_layer=4, n_head=4, n_embd=128)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **shape)
    model = GPT2LMHeadModel(config)
    seconds = 5 if cfg.tiny else (30 if cfg.quick else 180)
    with torch.enable_grad():
        trained = train(model, stream, seconds, max_steps=20 if cfg.tiny else 5000)
    log(f"quality: trained {shape} for {trained['steps']} steps in {trained['seconds']} s, "
        f"loss {trained['final_train_loss']}")
    if cfg.tiny:
        held_stream = held_stream[: 4 * CONTEXT + 1]
    engines = {q: _engine(copy.deepcopy(model), tokenizer, q) for q in ("none", "int8", "w8a8")}
    ppl = {q: perplexity(e, held_stream) for q, e in engines.items()}
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(len(held_stream) - 33, (8,), generator=gen).tolist()
    prompts = [held_stream[s:s + 32].tolist() for s in starts]
    new_tokens = 8 if cfg.tiny else 48
    outs = {q: greedy(e, prompts, new_tokens) for q, e in engines.items()}
    result = {
        "model": {**shape, "vocab": len(tokenizer), "context": CONTEXT,
                  "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)},
        "training": trained, "held_out_tokens": int(len(held_stream)),
        "float_ppl": round(ppl["none"], 4), "int8_ppl": round(ppl["int8"], 4),
        "int8_ppl_ratio": round(ppl["int8"] / ppl["none"], 5),
        "greedy_agreement": agreement(outs["none"], outs["int8"]),
        "w8a8_ppl": round(ppl["w8a8"], 4), "w8a8_ppl_ratio": round(ppl["w8a8"] / ppl["none"], 5),
        "greedy_agreement_w8a8": agreement(outs["none"], outs["w8a8"]),
        "greedy_rows": len(prompts), "greedy_new_tokens": new_tokens,
    }
    log(f"quality: ppl float {result['float_ppl']}, int8 {result['int8_ppl']} "
        f"(ratio {result['int8_ppl_ratio']}), w8a8 {result['w8a8_ppl']} (ratio {result['w8a8_ppl_ratio']}), "
        f"greedy agreement int8 {result['greedy_agreement']}, w8a8 {result['greedy_agreement_w8a8']}")
    return result
