"""`tokens.finite_rows`: the per-step NaN/inf check, a row sum first, exact per value when needed."""

from __future__ import annotations

import pytest
import torch

from server.engine.tokens import finite_rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_rows_matches_the_per_value_check(dtype):
    g = torch.Generator().manual_seed(0)
    block = (torch.randn(6, 5000, generator=g) * 30).to(dtype)
    block[1, 17] = float("nan")
    block[2, 4999] = float("inf")
    block[3, 0], block[3, 1] = float("inf"), float("-inf")  # their sum is NaN
    block[4] = torch.finfo(dtype).max  # every value finite; the row's sum overflows
    expected = torch.isfinite(block).all(dim=-1).tolist()
    assert expected == [True, False, False, False, True, True]
    assert finite_rows(block) == expected


def test_finite_rows_on_an_all_finite_batch_and_one_row():
    assert finite_rows(torch.randn(8, 50257)) == [True] * 8
    assert finite_rows(torch.tensor([[float("-inf"), 0.0]])) == [False]
