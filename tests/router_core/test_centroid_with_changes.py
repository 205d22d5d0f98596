"""`CentroidRouter.with_changes` (the catalogue's rebuild for the names that changed) gives the
router a full rebuild would, while checking only the changed adapters' centroids."""

from __future__ import annotations

import pytest
import torch

from router_core.centroid import CentroidRouter


def _cents(g: torch.Generator, rows: int) -> torch.Tensor:
    return torch.randn(rows, 16, generator=g)


@pytest.mark.parametrize("rows", [1, 24])  # single centroids, and enough rows per adapter to vote
def test_with_changes_equals_a_full_rebuild(rows):
    g = torch.Generator().manual_seed(0)
    sets = {f"a{i}": _cents(g, rows) for i in range(6)}
    router = CentroidRouter(sorted(sets), [sets[n] for n in sorted(sets)], temperature=0.3, vote=5)
    assert router.rows_checked == 6
    changes = {"a2": None, "a4": _cents(g, rows), "b0": _cents(g, rows)}  # removed, replaced, added
    updated = router.with_changes(changes)
    for name, c in changes.items():
        if c is None:
            sets.pop(name)
        else:
            sets[name] = c
    full = CentroidRouter(sorted(sets), [sets[n] for n in sorted(sets)], temperature=0.3, vote=5)
    assert updated.rows_checked == 2  # only the replaced and the added adapter were checked
    assert updated.adapter_names == full.adapter_names and updated.voting == full.voting == (rows >= 20)
    assert updated.temperature == 0.3
    for a, b in zip(updated.centroids, full.centroids, strict=True):
        assert torch.equal(a, b)
    emb = torch.randn(5, 16, generator=g)
    assert torch.allclose(updated.scores(emb), full.scores(emb))
    assert torch.allclose(updated.route(emb), full.route(emb))
    assert router.adapter_names == tuple(f"a{i}" for i in range(6))  # the old router is unchanged
    with pytest.raises(ValueError, match="dim"):
        router.with_changes({"c": torch.randn(1, 8)})
