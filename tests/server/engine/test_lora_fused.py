"""The LoRA delta's alternative paths in `MultiLoRAConv1D` compute what the two-call path computes.

- fused: the active A factors written into rows reserved under the base weight, one oneDNN
  linear yielding `x W + b` and `x A` together (`fused_rank`);
- fp32 factors: in bf16, the low-rank products computed in fp32 and added once (`fp32_factors`).

Each is checked against the baseline (the two-call path in the model's dtype) and against a
float64 reference, through the changes serving makes: the active set changing (so the reserved rows are rewritten), a hot swap
(`set_slot` on an active slot), rows without adapters (`ctx.rows`), prefill shapes (T > 1), a slot
whose adapter does not target the layer, and a stack too large for the reserved rows.

Tolerances: fp32, 1e-5 (the paths differ only in the order of fp32 sums). bf16 keeps 8
significant bits; both paths round `x A` and the output to bf16 but may order the fp32
accumulation inside the kernels differently, so they may differ by a few units in the last place
of the output: at most 2^-6 of its largest magnitude (4 ulps). Against float64 a bf16 path must be
no less accurate than the bf16 baseline (within twice its error, as
tests/server/engine/test_engine_bf16.py asks of the engine against PEFT).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from server.engine import cpu_linear
from server.engine.lora_layer import LoRABatchContext, MultiLoRAConv1D

pytestmark = pytest.mark.skipif(not cpu_linear.onednn_available(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN linear")

N_IN, N_OUT = 48, 80
RANKS = (4, 8)  # slots 0 and 1; slot 2 holds an adapter that does not target this layer


def _factors(seed: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N_IN, rank, generator=gen) * 0.3, torch.randn(rank, N_OUT, generator=gen) * 0.3


class Rig:
    """One Conv1D wrapped four ways (baseline, fused, fp32 factors, both) over one shared context,
    with the same adapters installed in each, and a float64 reference of what they compute."""

    def __init__(self, dtype: torch.dtype, reserve: int = 16) -> None:
        torch.manual_seed(0)
        conv = Conv1D(N_OUT, N_IN)
        torch.nn.init.normal_(conv.weight, std=0.2)
        torch.nn.init.normal_(conv.bias, std=0.2)
        self.conv = conv.to(dtype)
        self.dtype = dtype
        self.ctx = LoRABatchContext()
        self.layers = {
            "baseline": MultiLoRAConv1D(copy.deepcopy(self.conv), 3, self.ctx, fused_rank=0),
            "fused": MultiLoRAConv1D(copy.deepcopy(self.conv), 3, self.ctx, fused_rank=reserve),
            "fp32_factors": MultiLoRAConv1D(copy.deepcopy(self.conv), 3, self.ctx, fused_rank=0),
            "both": MultiLoRAConv1D(copy.deepcopy(self.conv), 3, self.ctx, fused_rank=reserve),
        }
        for name in ("baseline", "fused"):
            self.layers[name].set_factor_dtype(dtype)
        for name in ("fp32_factors", "both"):
            self.layers[name].set_factor_dtype(torch.float32)
        self.factors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None, None]
        for slot, rank in enumerate(RANKS):
            self.install(slot, _factors(slot, rank))
        self.install(2, None)

    def install(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.factors[slot] = pair
        for layer in self.layers.values():
            if pair is None:
                layer.set_slot(slot, None, None)
            else:
                layer.set_slot(slot, pair[0].to(self.dtype), pair[1].to(self.dtype))

    @torch.no_grad()
    def reference(self, x: torch.Tensor, active: tuple[int, ...], gates: torch.Tensor) -> torch.Tensor:
        d = torch.float64
        y = x.to(d) @ self.conv.weight.to(d) + self.conv.bias.to(d)  # [B, T, out]
        for col, slot in enumerate(active):
            pair = self.factors[slot]
            if pair is not None:
                a, b = (t.to(self.dtype).to(d) for t in pair)
                y = y + gates[:, col, None, None].to(d) * ((x.to(d) @ a) @ b)
        return y

    def run(self, x: torch.Tensor, active: tuple[int, ...], gates: torch.Tensor) -> dict[str, torch.Tensor]:
        used = gates.ne(0).any(dim=1)
        rows = None if bool(used.all()) else used.nonzero().flatten()
        self.ctx.set(active, gates.to(self.dtype), rows)
        with torch.inference_mode():
            out = {name: layer(x).double() for name, layer in self.layers.items()}
        self.ctx.clear()
        return out

    def check(self, x: torch.Tensor, active: tuple[int, ...], gates: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.run(x, active, gates)
        ref = self.reference(x, active, gates.to(self.dtype))
        baseline = out["baseline"]
        if self.dtype == torch.float32:
            for name in ("fused", "fp32_factors", "both"):
                torch.testing.assert_close(out[name], baseline, rtol=1e-5, atol=1e-5, msg=name)
        else:
            ulps = 2.0 ** -6 * float(baseline.abs().max())
            err_baseline = float((baseline - ref).abs().max())
            for name in ("fused", "fp32_factors", "both"):
                assert float((out[name] - baseline).abs().max()) <= ulps, name
                assert float((out[name] - ref).abs().max()) <= 2 * err_baseline, name
            torch.testing.assert_close(baseline, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_fp32_factor_paths_match_the_baseline_through_serving_changes(dtype):
    rig = Rig(dtype)
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(3, 1, N_IN, generator=gen).to(dtype)  # a decode step: 3 rows, one token each
    gates = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.2, 0.8]])

    rig.check(x1, (0, 1), gates)
    assert rig.layers["fused"]._tail == (0, 1)  # the fused call was made, with these A rows
    # another active set, including slot 2, whose adapter does not target this layer
    rig.check(x1, (1, 2, 0), torch.tensor([[0.5, 0.2, 0.3], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8]]))
    assert rig.layers["fused"]._tail == (1, 2, 0)
    rig.check(x1, (0, 1), gates)  # back: the rows are rewritten
    # a hot swap of an active slot (a new version, another rank): the rows must follow
    rig.install(0, _factors(10, 6))
    rig.check(x1, (0, 1), gates)
    # rows without any adapter (ctx.rows set): the baseline adds to the other rows only
    out = rig.check(x1, (0, 1), torch.tensor([[0.0, 0.0], [0.4, 0.6], [0.0, 0.0]]))
    base = rig.run(x1, (2,), torch.ones(3, 1))["baseline"]  # only an adapter this layer lacks: the base
    for name, y in out.items():
        assert torch.equal(y[[0, 2]], base[[0, 2]]), name  # exactly the base output where no adapter is used
    # a prefill (T > 1), some rows without adapters
    x5 = torch.randn(3, 5, N_IN, generator=gen).to(dtype)
    rig.check(x5, (1, 0), torch.tensor([[0.3, 0.7], [0.0, 0.0], [1.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stack_larger_than_the_reserved_rows_takes_the_two_call_path(dtype):
    rig = Rig(dtype, reserve=8)  # ranks 6 + 8 = 14 > 8 after the swap below; 4 + 8 = 12 > 8 already
    x = torch.randn(2, 1, N_IN, generator=torch.Generator().manual_seed(2)).to(dtype)
    rig.check(x, (0, 1), torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    assert rig.layers["fused"]._tail is None  # never written: did not fit
    rig.check(x, (1,), torch.tensor([[1.0], [0.5]]))  # rank 8 alone fits
    assert rig.layers["fused"]._tail == (1,)


def test_only_an_adapter_the_layer_lacks_leaves_the_base_output():
    rig = Rig(torch.float32)
    x = torch.randn(2, 3, N_IN, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = rig.conv(x)
    for name, y in rig.run(x, (2,), torch.ones(2, 1)).items():
        torch.testing.assert_close(y, expected.double(), rtol=1e-6, atol=1e-6, msg=name)


def test_reserved_rows_keep_the_conv1d_shape_values_and_state_dict():
    conv = Conv1D(N_OUT, N_IN)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    layer = MultiLoRAConv1D(conv, 2, LoRABatchContext(), fused_rank=16)
    assert layer.weight_ext is not None and layer.weight_ext.shape == (N_OUT + 16, N_IN)
    assert layer.bias_ext is not None and layer.bias_ext.shape == (N_OUT + 16,)
    assert conv.weight.shape == (N_IN, N_OUT) and conv.bias.shape == (N_OUT,)
    assert conv.weight.data_ptr() == layer.weight_ext.data_ptr()  # a view: the weight is stored once
    assert conv.bias.data_ptr() == layer.bias_ext.data_ptr()
    assert torch.equal(layer.bias_ext[N_OUT:], torch.zeros(16))  # the reserved rows add no bias
    for key, value in conv.state_dict().items():
        assert torch.equal(value, before[key])


def test_the_bench_comparison_runs_every_path_on_a_whole_model():
    """`python -m bench.profile_engine --candidate fused_lora` on a tiny GPT-2: every path decodes,
    and their logits agree with the baseline's (bf16: within bf16 rounding of logits of order 1)."""
    from bench.profile_engine import fused_lora

    for dtype, modes, tol in ((torch.float32, {"fused"}, 1e-4),
                              (torch.bfloat16, {"fused", "fp32_factors", "fused_fp32_factors"}, 0.1)):
        result = fused_lora(dtype, (1, 3), rounds=1, steps=1, tiny=True)
        for batch in ("b1", "b3"):
            assert set(result[batch]["baseline_over_candidate_per_round"]) == modes
            assert set(result[batch]["median_ms"]) == {"baseline", "no_adapters", *modes}
            for mode, diff in result[batch]["max_abs_logit_diff"].items():
                assert diff <= tol, (dtype, batch, mode, diff)
