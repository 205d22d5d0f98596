"""Tiny GPT-2s and LoRA adapters built in code, so no test downloads anything.

The tokenizer is a byte-level BPE trained on a few sentences: it round-trips any text
(byte fallback), which is what the server's stop-string and streaming code relies on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

TINY_CONFIG = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, n_ctx=128)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The benchmarks' tiny byte-level BPE (vocabulary 400), so tests and bench agree on ids."""
    from bench.common import build_tokenizer as bench_tokenizer

    return bench_tokenizer()


def build_model(seed: int = 0, **overrides) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    tokenizer = build_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**TINY_CONFIG, **overrides},
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    return model, tokenizer


def save_model(path: Path, seed: int = 0, **overrides) -> Path:
    model, tokenizer = build_model(seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    seed: int,
    rank: int = 4,
    alpha: int = 8,
    targets: tuple[str, ...] = ("c_attn", "c_proj"),
    scale_b: float = 1.0,
    use_rslora: bool = False,
) -> Path:
    """Save a PEFT LoRA adapter with non-zero random A and B (init_lora_weights=False)."""
    base = GPT2LMHeadModel.from_pretrained(base_dir)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        fan_in_fan_out=True,
        init_lora_weights=False,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, cfg)
    if scale_b != 1.0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale_b)
    peft_model.save_pretrained(out_dir)
    # PEFT records the base path it saw; keep the folder portable.
    cfg_path = out_dir / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = "tiny-gpt2"
    cfg_path.write_text(json.dumps(data, indent=2))
    return out_dir


def peft_reference(model_dir: Path, store: Path, weights: dict[str, float] | None) -> torch.nn.Module:
    """The PEFT reference for a fixed adapter or mixture: the base model alone (no weights), one
    adapter as saved (weight 1.0), or `add_weighted_adapter(combination_type="cat")` over several,
    which is what the engine's per-row mixture must reproduce."""
    base = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    if not weights:
        return base
    names = list(weights)
    model = PeftModel.from_pretrained(base, store / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(store / name, adapter_name=name)
    if len(names) > 1 or weights[names[0]] != 1.0:
        model.add_weighted_adapter(names, list(weights.values()), "mix", combination_type="cat")
        model.set_adapter("mix")
    return model.eval()


def app_settings(model_dir: Path, store_dir: Path, **overrides):
    """Settings for a test app: tiny model on CPU fp32, admin token `T`; `overrides` per group,
    e.g. `engine={"max_loras": 2}`."""
    from server.settings import Settings

    base = {"model": {"base_model": str(model_dir), "device": "cpu", "dtype": "float32"},
            "store": {"adapter_dir": store_dir}, "server": {"admin_token": "T"}, "routing": {"embedder": "base"}}
    kwargs = {}
    for name, cls in Settings.groups().items():
        kwargs[name] = cls(**{**base.get(name, {}), **overrides.get(name, {})})
    return Settings(**kwargs)


def run_engine(engine, seqs) -> dict[int, list]:
    """Submit `seqs` (their `emit` is replaced) and step the engine until all finish; returns events by seq id."""
    events: dict[int, list] = {s.id: [] for s in seqs}
    for s in seqs:
        s.emit = events[s.id].append
        engine.submit(s)
    for _ in range(10_000):
        if not engine.has_work():
            break
        engine.step()
    return events
