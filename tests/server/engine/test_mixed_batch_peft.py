"""Rows on different single adapters in one batch against PEFT's mixed-batch inference
(`adapter_names`), with the adapters indexed lazily and a host tier too small for all of them, so
their factors are read from disk, evicted and read again between forwards."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import GPT2LMHeadModel

from server.engine import gpt2
from server.engine.adapter_weights import BaseSpec
from server.engine.base_model import load_base_model
from server.engine.engine import Engine, EngineConfig
from server.engine.host_tier import HostTier
from server.engine.registry import AdapterRegistry
from server.store.folder import index_adapter
from tests.server.engine.rows import PROMPT
from tests.tiny import make_adapter

NAMES = ("alpha", "beta", "gamma")


@pytest.fixture()
def setup(store, tiny_model_dir):
    make_adapter(tiny_model_dir, store / "gamma", seed=3, rank=2, alpha=2, targets=("c_attn", "c_proj", "c_fc"))
    resident = load_base_model(str(tiny_model_dir), "cpu", "float32")
    registry = AdapterRegistry(HostTier(max_adapters=2))
    spec = BaseSpec(resident.module_shapes, resident.fingerprint, 64)
    for name in NAMES:
        registry.register(index_adapter(name, store / name, spec, store))
    engine = Engine(resident, registry, EngineConfig(max_loras=3))
    base = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    peft = PeftModel.from_pretrained(base, store / "alpha", adapter_name="alpha")
    for name in NAMES[1:]:
        peft.load_adapter(store / name, adapter_name=name)
    return engine, peft.eval()


def engine_logits(engine: Engine, row_adapters: list[str | None]) -> torch.Tensor:
    """Logits of PROMPT for each row in one forward, row i on `row_adapters[i]` alone (None = the
    base model): the gate matrix is one-hot per row over the adapters the batch uses."""
    B, T = len(row_adapters), len(PROMPT)
    names = [a for a in dict.fromkeys(row_adapters) if a is not None]
    active = tuple(engine.slots.ensure([engine.registry.get(n) for n in names]))
    gates = torch.tensor([[1.0 if a == n else 0.0 for n in names] for a in row_adapters]).reshape(B, len(names))
    rows = gates.ne(0).any(dim=1).nonzero().flatten()
    engine.cache.reserve(B, T)
    with torch.inference_mode(), engine.ctx.applied(active, gates if names else None, rows if names else None):
        logits, _ = gpt2.forward(engine.resident.model, torch.tensor([PROMPT] * B), torch.arange(T).expand(B, T),
                                 engine.cache, all_logits=True)
    return logits


def test_rows_on_different_adapters_match_peft_adapter_names(setup):
    engine, peft = setup
    rows = ["alpha", "beta", None, "gamma", "alpha"]
    with torch.no_grad():
        ref = peft(torch.tensor([PROMPT] * len(rows)),
                   adapter_names=[a or "__base__" for a in rows]).logits
    got = engine_logits(engine, rows)
    assert (got - ref).abs().max().item() <= 1e-4
    assert (ref[0] - ref[1]).abs().max().item() > 1e-3  # the adapters differ: the check can fail
    host = engine.registry.host
    assert host.loads >= 3 and len(host) <= 2  # read from disk on demand, within the budget
    for r, name in enumerate(rows):  # each row alone equals its row in the batch
        if name is not None:
            engine.slots.evict(engine.slots.slot_of(engine.registry.get(name)))  # refilled from the host tier / disk
        assert (engine_logits(engine, [name])[0] - got[r]).abs().max().item() <= 1e-5
    assert host.evictions >= 1 and host.loads >= 4
