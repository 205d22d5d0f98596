"""MLP router: shapes, softmax weights, load-balance loss, save/load round trip, refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from router_core import (
    FEATURE_NAMES,
    ArtifactError,
    MLPRouter,
    MLPRouterNet,
    load_balance_loss,
    load_router,
    save_router,
)

D, C, N = 16, len(FEATURE_NAMES), 3
NAMES = ["code", "prose", "math"]


def make_router(seed: int = 0, **kw) -> MLPRouter:
    torch.manual_seed(seed)
    return MLPRouter(MLPRouterNet(D, N, C, hidden=32), NAMES, "minilm:test", **kw)


def inputs(b: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(b, D, generator=g), dim=-1)  # [b, D]
    return emb, torch.rand(b, C, generator=g)  # [b, C]


def test_net_shapes() -> None:
    net = MLPRouterNet(D, N, C)  # default hidden 256 (complexity-aware MoLoRA)
    logits, score = net(torch.randn(7, D + C))
    assert logits.shape == (7, N) and score.shape == (7,)
    assert ((score > 0) & (score < 1)).all()
    assert net.expected_shapes()["fc.weight"] == (256, D + C)


def test_route_is_a_softmax() -> None:
    router = make_router()
    emb, cx = inputs()
    w = router.route(emb, cx)
    assert w.shape == (5, N)
    assert torch.allclose(w.sum(-1), torch.ones(5))
    logits, _ = router.net(torch.cat([emb, cx], -1))
    assert torch.allclose(w, torch.softmax(logits, -1), atol=1e-6)
    sharp = router.route(emb, cx, temperature=0.1)
    assert (sharp.max(-1).values >= w.max(-1).values - 1e-6).all()
    top1 = router.route(emb, cx, top_k=1)
    assert torch.equal(top1.argmax(-1), w.argmax(-1)) and ((top1 > 0).sum(-1) == 1).all()
    assert router.predict_complexity(emb, cx).shape == (5,)


def test_route_input_checks() -> None:
    router = make_router()
    emb, cx = inputs()
    assert router.needs_complexity
    with pytest.raises(ValueError, match="complexity"):
        router.route(emb)
    with pytest.raises(ValueError):
        router.route(emb[:, :8], cx)
    with pytest.raises(ValueError):
        router.route(emb, cx[:, :2])
    no_cx = MLPRouter(MLPRouterNet(D, N, 0, hidden=8), NAMES, "base")
    assert not no_cx.needs_complexity and no_cx.route(emb).shape == (5, N)
    with pytest.raises(ValueError):
        MLPRouter(MLPRouterNet(D, 2, C), NAMES, "x")  # 3 names, 2 outputs


def test_load_balance_loss() -> None:
    balanced = torch.eye(3).repeat(2, 1)  # [6, 3] each adapter top twice, mean prob 1/3
    assert torch.isclose(load_balance_loss(balanced), torch.tensor(1.0))
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert torch.isclose(load_balance_loss(collapsed), torch.tensor(3.0))
    logits = torch.randn(8, 3, requires_grad=True)
    load_balance_loss(torch.softmax(logits, -1)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_save_load_round_trip(tmp_path: Path) -> None:
    router = make_router(top_k=2, temperature=0.7)
    save_router(tmp_path / "r", router, extra={"accuracy": 0.97})
    cfg = json.loads((tmp_path / "r" / "router.json").read_text())
    assert cfg["kind"] == "mlp" and cfg["adapters"] == NAMES and cfg["embedder_id"] == "minilm:test"
    assert (cfg["embed_dim"], cfg["complexity_dim"], cfg["hidden"]) == (D, C, 32)
    assert cfg["complexity_features"] == list(FEATURE_NAMES) and cfg["extra"] == {"accuracy": 0.97}
    loaded = load_router(tmp_path / "r", available_adapters={"code", "prose", "math", "other"}, embed_dim=D)
    assert loaded.adapter_names == tuple(NAMES) and (loaded.top_k, loaded.temperature) == (2, 0.7)
    emb, cx = inputs()
    assert torch.equal(loaded.route(emb, cx), router.route(emb, cx))
    assert torch.equal(loaded.predict_complexity(emb, cx), router.predict_complexity(emb, cx))
    assert not list((tmp_path / "r").glob("*.tmp"))  # atomic writes leave no temp files


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return save_router(tmp_path / "router", make_router())


def _edit_json(d: Path, **changes) -> None:
    cfg = json.loads((d / "router.json").read_text())
    cfg.update(changes)
    (d / "router.json").write_text(json.dumps(cfg))


def test_refuses_missing_files(saved: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_router(saved.parent / "nope")
    (saved / "router.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing router.safetensors"):
        load_router(saved)
    (saved / "router.json").unlink()
    with pytest.raises(ArtifactError, match="missing router.json"):
        load_router(saved)


def test_refuses_unknown_adapter_and_wrong_dim(saved: Path) -> None:
    with pytest.raises(ArtifactError, match=r"not loaded: \['math'\]"):
        load_router(saved, available_adapters={"code", "prose"})
    with pytest.raises(ArtifactError, match="embed_dim=16 but the embedder gives 384"):
        load_router(saved, embed_dim=384)


def test_refuses_bad_json(saved: Path) -> None:
    (saved / "router.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON") as info:
        load_router(saved)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "transformer"}, "unknown router kind"),
        ({"embed_dim": "16"}, "wrong type"),
        ({"adapters": ["code", "code", "math"]}, "unique"),
        ({"complexity_features": ["a"]}, "complexity_features"),
        ({"top_k": 0}, "top_k"),
        ({"hidden": 64}, "shape"),  # declared net no longer matches the tensors
        ({"adapters": ["code", "prose"]}, "shape"),
    ],
)
def test_refuses_inconsistent_json(saved: Path, changes: dict, message: str) -> None:
    _edit_json(saved, **changes)
    with pytest.raises(ArtifactError, match=message):
        load_router(saved)


def test_refuses_wrong_tensors(saved: Path) -> None:
    path = saved / "router.safetensors"
    state = load_file(str(path))
    bad = dict(state, **{"route_head.weight": torch.zeros(4, 32)})
    save_file(bad, str(path))
    with pytest.raises(ArtifactError, match=r"'route_head.weight' has shape \[4, 32\], expected \[3, 32\]"):
        load_router(saved)
    save_file({k: v for k, v in state.items() if k != "fc.bias"}, str(path))
    with pytest.raises(ArtifactError, match=r"missing \['fc.bias'\]"):
        load_router(saved)
    save_file(dict(state, extra=torch.zeros(1)), str(path))
    with pytest.raises(ArtifactError, match=r"unexpected \['extra'\]"):
        load_router(saved)
    save_file(dict(state, **{"fc.bias": torch.full((32,), float("nan"))}), str(path))
    with pytest.raises(ArtifactError, match="finite"):
        load_router(saved)
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError, match="not a readable safetensors") as info:
        load_router(saved)
    assert info.value.__cause__ is not None


class _Boom:
    """Unpickling this touches a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_weights_are_never_read(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "unpickled"
    (saved / "router.safetensors").unlink()
    (saved / "router.bin").write_bytes(pickle.dumps(_Boom(marker)))

    def forbidden(*a, **k):
        raise AssertionError("torch.load / pickle.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(ArtifactError, match=r"refusing pickle weights \['router.bin'\]"):
        load_router(saved)
    assert not marker.exists()
