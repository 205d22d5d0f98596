"""Engines and rows for the engine's tests: an fp32 engine on the tiny model with the store's
adapters, a fixed-mixture sequence, the references it must hold before `Engine.submit`, and the
token ids out of its events (one copy, shared by the parity, bf16, static-step, isolation and
batch tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from server.engine import gpt2
from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import load_base_model
from server.engine.engine import Engine, EngineConfig
from server.engine.registry import AdapterRegistry
from server.engine.sampling import SamplingParams
from server.engine.sequence import RoutingSpec, Sequence
from server.store.folder import read_adapter
from tests.tiny import run_engine

PROMPT = [5, 17, 42, 8, 99, 3, 250, 11, 64]


def tiny_engine(store: Path, model_dir: Path, names: tuple[str, ...] = ("alpha", "beta"),
                quant: str = "none", **config) -> Engine:
    """An fp32 engine on the tiny model with `names` from `store` registered (`quant`: --quant,
    `config`: EngineConfig)."""
    resident = load_base_model(str(model_dir), "cpu", "float32", quant)
    registry = AdapterRegistry()
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64)
    for name in names:
        registry.register(read_adapter(name, store / name, spec))
    return Engine(resident, registry, EngineConfig(**{"max_loras": 4, **config}))


def row(prompt: list[int], weights: dict[str, float], max_tokens: int = 12,
        decode: Callable[[list[int]], str] | None = None, **sampling) -> Sequence:
    """A sequence on a fixed mixture (`{}` = the base model), greedy unless `sampling` says
    otherwise; it holds no adapter references yet (see `hold`)."""
    return Sequence(prompt_ids=list(prompt), max_tokens=max_tokens,
                    sampling=SamplingParams(**{"temperature": 0.0, **sampling}),
                    routing=RoutingSpec("fixed", weights), decode=decode or (lambda ids: "x" * len(ids)),
                    emit=lambda ev: None)


def hold(engine: Engine, seq: Sequence) -> Sequence:
    """Take the references on the adapters `seq` uses, as a request does before it submits."""
    seq.versions = {v.name: v for v in engine.registry.acquire(list(seq.routing.weights))}
    return seq


def held_row(engine: Engine, prompt: list[int], weights: dict[str, float], max_tokens: int = 12,
             decode: Callable[[list[int]], str] | None = None, **sampling) -> Sequence:
    return hold(engine, row(prompt, weights, max_tokens, decode, **sampling))


def token_ids(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def prompt_logits(engine: Engine, weights: dict[str, float]) -> torch.Tensor:
    """Every position's logits for PROMPT under the fixed mixture `weights` ({} = the base), fp32."""
    versions = [engine.registry.get(n) for n in weights]
    ctx = engine.ctx
    if weights:
        ctx.set(tuple(engine.slots.ensure(versions)), torch.tensor([list(weights.values())]), None)
    with torch.inference_mode():
        logits, _ = gpt2.forward(engine.resident.model, torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None],
                                 engine.cache, all_logits=True)
    ctx.clear()
    return logits.float()


def assert_quantised_engine_close(e32: Engine, eq: Engine, tol: float) -> None:
    """A `--quant` engine against the float one on the same model and adapters: base and mixture
    logits within `tol` (relative, Frobenius), and the LoRA delta the float one to `tol` (factors
    and gates stay float), the adapters' effect dwarfing the rounding."""
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    base32, baseq = prompt_logits(e32, {}), prompt_logits(eq, {})
    assert 0 < rel(baseq, base32) < tol
    mix = {"alpha": 0.3, "beta": 0.7}
    mix32, mixq = prompt_logits(e32, mix), prompt_logits(eq, mix)
    assert rel(mixq, mix32) < tol
    delta32, deltaq = mix32 - base32, mixq - baseq
    assert delta32.norm() > 10 * (baseq - base32).norm()  # the adapters' effect dwarfs the rounding
    assert rel(deltaq, delta32) < tol  # LoRA stays float: its delta is the float one


def alone_and_batched(engine: Engine, specs: list[tuple[list[int], dict[str, float], int]]
                      ) -> tuple[list[list[int]], list[torch.Tensor], list[list[int]], list[torch.Tensor]]:
    """Each (prompt, mixture, max_tokens) row run alone, then all of them in one batch: the token
    ids and chosen-token log-probs of each, alone and batched, in `specs`' order."""
    alone, alone_lp = [], []
    for prompt, weights, n in specs:
        seq = hold(engine, row(prompt, weights, max_tokens=n))
        events = run_engine(engine, [seq])[seq.id]
        alone.append(token_ids(events))
        alone_lp.append(torch.tensor([e.logprob for e in events]))
    batch = [hold(engine, row(p, w, max_tokens=n)) for p, w, n in specs]
    out = run_engine(engine, batch)
    together = [token_ids(out[s.id]) for s in batch]
    together_lp = [torch.tensor([e.logprob for e in out[s.id]]) for s in batch]
    return alone, alone_lp, together, together_lp
