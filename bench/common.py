"""Shared pieces of the benchmarks: the run's configuration and environment record, the model,
tokenizer and adapters built in code, and timing helpers (`bench.rig` sets up the engine).

Nothing is downloaded: the base model is `GPT2Config()` (the real 124M shape) with random weights,
since decode speed depends on the shape only; the tokenizer is a small byte-level BPE trained on a
few sentences (token ids it produces are far below GPT-2's vocabulary of 50257, so it can encode
prompts for the HTTP benchmark and decode whatever the model generates; ids it does not know
decode to nothing, which is fine for timing).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROMPT_TOKENS = 64
REROUTE_EVERY = 2
N_ROUTED = 4
ADAPTER_RANK = 16
ADAPTER_TARGETS = ("c_attn", "c_proj")

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "must be in want of a wife. Mr. Holmes looked at the letter and smiled.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The quick brown fox jumps over the lazy dog. import numpy as np\nx = np.zeros(3)",
]


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What one run measures. `quick` and `tiny` only shrink it; the code paths are the same."""

    quick: bool = False
    tiny: bool = False  # a tiny GPT-2 (tests): seconds, numbers meaningless
    new_tokens: int = 128
    prompt_tokens: int = PROMPT_TOKENS
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 3
    remerge_tokens: int = 128  # tokens actually decoded by the PEFT re-merge loop (extrapolated beyond)
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    serving_tokens: int = 128
    serving_rounds: int = 2
    ranks: tuple[int, ...] = (8, 16, 64)
    register_repeats: int = 10
    resident_counts: tuple[int, ...] = (1, 4, 16, 64)
    resident_tokens: int = 16
    resident_repeats: int = 3
    router_calls: int = 50
    threads: int = 2
    compile: bool = False  # also measure the engine with the static decode step, eager and compiled
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    sections: tuple[str, ...] = ("decode", "serving", "lifecycle", "router", "grammar")
    notes: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, quick: bool = False, tiny: bool = False, device: str = "auto", threads: int = 2,
             sections: Iterable[str] | None = None, dtype: str = "auto", compile: bool = False) -> BenchConfig:
        from server.engine.base_model import resolve_dtype

        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        # the engine's dtype, as `switchboard serve --dtype` resolves it (auto: what the device computes fastest)
        cfg = cls(quick=quick, tiny=tiny, threads=threads, device=dev, dtype=resolve_dtype(dtype, torch.device(dev)),
                  compile=compile)
        if sections is not None:
            cfg.sections = tuple(sections)
        if quick:
            cfg.new_tokens = 32
            cfg.repeats = 3
            cfg.remerge_tokens = 8
            cfg.serving_tokens = 32
            cfg.serving_rounds = 1
            cfg.concurrency = (1, 8)  # the levels the ratios read (http8_*); 4 and 16 in a full run
            cfg.register_repeats = 5
            cfg.resident_tokens = 8
            cfg.resident_repeats = 1
            cfg.router_calls = 20
            cfg.notes.append("quick mode: 32 new tokens per sequence instead of 128 (the prompt stays 64 tokens)")
            cfg.notes.append("quick mode: the PEFT re-merge loop decodes 8 tokens; its tok/s for 32 tokens is "
                             "extrapolated from the measured prefill and per-token cost")
            cfg.notes.append("quick mode: HTTP serving at 1 and 8 clients (4 and 16 in a full run); the quality "
                             "model trains for 30 s instead of 180")
        if tiny:
            cfg.new_tokens = 6
            cfg.prompt_tokens = 8
            cfg.repeats = 1
            cfg.remerge_tokens = 4
            cfg.concurrency = (1, 2)
            cfg.serving_tokens = 4
            cfg.serving_rounds = 1
            cfg.register_repeats = 2
            cfg.resident_counts = (1, 4)
            cfg.resident_tokens = 4
            cfg.resident_repeats = 1
            cfg.router_calls = 2
            cfg.notes.append("tiny mode: a 2-layer GPT-2 for testing the benchmark code; the numbers mean nothing")
        return cfg

    @property
    def rank_key(self) -> Callable[[int], str]:
        return lambda r: f"r{r}"


def setup_torch(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    torch.set_grad_enabled(False)


def environment(cfg: BenchConfig) -> dict:
    import peft
    import transformers

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "device": cfg.device,
        "device_name": torch.cuda.get_device_name(0) if cfg.device.startswith("cuda") else cpu_model,
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        env["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    env.update(git_state())
    return env


def git_state() -> dict:
    """The commit measured, and whether the working tree differs from it (numbers of a dirty
    tree describe code that is not in any commit)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "server", "router_core"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty_engine": bool(dirty)} if commit else {}


def routing_settings(**overrides):
    """The server's routing defaults, with the `base` embedder and the centroid router."""
    from server.settings import RoutingSettings

    return RoutingSettings(embedder="base", router="centroid", reroute_every=REROUTE_EVERY, **overrides)


def route_window(settings=None) -> int:
    """Tokens the `base` embedder pools."""
    return (settings or routing_settings()).route_window



# -- model, tokenizer, adapters -------------------------------------------------------------------------
def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def gpt2_config(tiny: bool):
    from transformers import GPT2Config

    if tiny:
        return GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=1000)
    return GPT2Config()  # the 124M shape, vocabulary 50257


def build_base(cfg: BenchConfig, seed: int = 0):
    """The base model (random weights) on the bench device; generation never stops on EOS."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(cfg.tiny)).eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():  # token 0 is the tokenizer's <|endoftext|>: a zero row keeps greedy decoding
        model.transformer.wte.weight[0].zero_()  # from ever picking it, so the server never stops early
    return model.to(cfg.device, cfg.dtype)


def clone(model):
    """An independent copy (PEFT and the engine both wrap modules in place)."""
    return copy.deepcopy(model)


def random_prompts(cfg: BenchConfig, batch: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, cfg.prompt_tokens), generator=g)  # [B, T]


def lora_config(rank: int, targets: Iterable[str] = ADAPTER_TARGETS, alpha: int | None = None):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), fan_in_fan_out=True,
                      init_lora_weights=False, task_type="CAUSAL_LM")


def write_adapters(base, out: Path, specs: list[tuple[str, int]], seed: int = 100,
                   centroid_dim: int | None = None) -> dict[str, Path]:
    """Save one PEFT LoRA folder per (name, rank) in `out`, with random non-zero A and B
    (`init_lora_weights=False`, B scaled down so activations stay finite), and, when
    `centroid_dim` is given, a random unit centroid for the `base:32` embedder."""
    from peft import get_peft_model

    from router_core.artifacts import save_centroids

    work = clone(base).float().cpu()
    peft_model = None
    folders = {}
    for i, (name, rank) in enumerate(specs):
        torch.manual_seed(seed + i)
        if peft_model is None:
            peft_model = get_peft_model(work, lora_config(rank), adapter_name=name)
        else:
            peft_model.add_adapter(name, lora_config(rank))
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if f"lora_B.{name}." in pname:
                    p.mul_(0.01)
        peft_model.save_pretrained(str(out), selected_adapters=[name])  # writes out/<name>/
        folder = out / name
        cfg_path = folder / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = "gpt2-random"
        cfg_path.write_text(json.dumps(data, indent=2))
        if centroid_dim is not None:
            g = torch.Generator().manual_seed(seed + 1000 + i)
            save_centroids(folder / "centroid.safetensors", torch.randn(1, centroid_dim, generator=g),
                           f"base:{route_window()}")
        folders[name] = folder
    del peft_model, work
    gc.collect()
    return folders


# -- timing ---------------------------------------------------------------------------------------------------
def sync(cfg: BenchConfig) -> None:
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_stats(batch: int, new_tokens: int, seconds: float, ttft: float, all_first: float) -> dict:
    """tok/s over the whole call (prefill included), ms per decode step after the first token."""
    steps = max(new_tokens - 1, 1)
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 4),
        "tok_s": round(batch * new_tokens / seconds, 2),
        "ms_per_step": round(1000 * max(seconds - all_first, 0.0) / steps, 3),
        "ttft_ms": round(1000 * ttft, 2),
    }


def median_run(runs: list[dict], key: str = "seconds") -> dict:
    """The median repeat (the lower middle one for an even count), with the spread of tok/s over
    all repeats: `spread_pct` = (max − min) ÷ median. The median of interleaved repeats moves less
    between runs than the minimum, which one lucky repeat decides."""
    ordered = sorted(runs, key=lambda r: r[key])
    mid = ordered[(len(ordered) - 1) // 2]
    toks = [r["tok_s"] for r in runs]
    spread = 100 * (max(toks) - min(toks)) / mid["tok_s"] if mid["tok_s"] else 0.0
    return {**mid, "all_tok_s": toks, "spread_pct": round(spread, 1)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return round(a / b, 3)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
