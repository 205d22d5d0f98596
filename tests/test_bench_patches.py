"""The candidate engine speed-ups measured by `bench.profile_engine` keep the engine's output:
on a tiny GPT-2, every patch alone and all together give the same greedy tokens as the engine
as shipped, for fixed, routed and mixed batches (rows joining with prompts of different lengths)."""

from __future__ import annotations

import pytest
import torch

from bench import engine_patches
from bench.common import Assets, BenchConfig, engine_generate, random_prompts, setup_torch


@pytest.fixture(scope="module")
def assets(tmp_path_factory, torch_state_restored):
    cfg = BenchConfig.make(tiny=True, device="cpu", threads=1)
    setup_torch(1)
    return Assets(cfg, tmp_path_factory.mktemp("bench-patches"))


def _specs(batch: int):
    from server.engine.sequence import RoutingSpec

    routed = RoutingSpec("auto", router="centroid", reroute_every=2)
    return [routed if i % 2 == 0 else RoutingSpec("fixed", {f"a{i % 4}": 1.0}) for i in range(batch)]


@pytest.mark.parametrize("patches", [(p,) for p in engine_patches.PATCHES] + [engine_patches.PATCHES])
def test_patches_keep_greedy_tokens(assets, patches):
    rig = assets.engine_rig()
    vocab = assets.base.config.vocab_size
    for batch in (1, 3):
        prompts = random_prompts(assets.cfg, batch, vocab, seed=batch)
        shipped = engine_generate(rig, prompts, 6, _specs(batch))["generated"]
        with engine_patches.patched(patches):
            got = engine_generate(rig, prompts, 6, _specs(batch))["generated"]
        assert got == shipped


def test_patched_forward_matches_shipped_logits(assets):
    from server.engine import gpt2
    from server.engine.kv_cache import KVCache

    rig = assets.engine_rig()
    rig.engine.ctx.clear()  # no adapter: the base model through both forwards
    model = rig.resident.model
    cfg = model.config
    ids = random_prompts(assets.cfg, 2, cfg.vocab_size, seed=5)  # [2, T]
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)

    def run():
        cache = KVCache(cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_positions, torch.float32,
                        torch.device("cpu"))
        cache.reserve(2, ids.shape[1] + 1)
        with torch.inference_mode():
            first, _ = gpt2.forward(model, ids, pos, cache)
            nxt, _ = gpt2.forward(model, first.argmax(-1, keepdim=True), pos[:, -1:] + 1, cache)
        return first, nxt

    engine_patches._remember()
    expected = run()
    with engine_patches.patched(("fast_attention", "head_t")):
        got = run()
    for a, b in zip(expected, got, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
