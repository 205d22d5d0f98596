"""The LoRA gates of a forward are expanded to rank columns once per column layout, not once per
wrapped projection (`LoRABatchContext.gates_for`): every projection an adapter set targets the
same way shares one expansion. Numerics are pinned by the parity tests; this pins the count."""

from __future__ import annotations

from tests.server.engine.rows import PROMPT, held_row, tiny_engine
from tests.tiny import run_engine


def _layouts_per_forward(engine, rows) -> list[int]:
    seen: list[int] = []
    orig = engine._forward

    def spy(ids, pos, r, last=None):
        out = orig(ids, pos, r, last)
        seen.append(len(engine.ctx._expanded))  # still inside the forward's gate scope
        return out

    engine._forward = spy
    run_engine(engine, rows)
    return seen


def test_one_expansion_per_layout(store, tiny_model_dir, one_torch_thread):
    engine = tiny_engine(store, tiny_model_dir)
    wrapped = len(engine.slots.layers)
    # alpha targets c_attn and both c_proj (rank 4): one layout in every projection it wraps
    assert set(_layouts_per_forward(engine, [held_row(engine, PROMPT, {"alpha": 1.0}, max_tokens=3)])) == {1}
    # alpha + beta (rank 8, c_attn and c_fc): c_attn has both, c_proj alpha's, c_fc beta's
    both = [held_row(engine, PROMPT, {"alpha": 0.5, "beta": 0.5}, max_tokens=3),
            held_row(engine, PROMPT[2:], {"beta": 1.0}, max_tokens=3), held_row(engine, PROMPT[:4], {}, max_tokens=3)]
    assert set(_layouts_per_forward(engine, both)) == {3} and wrapped > 3
