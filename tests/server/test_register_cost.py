"""Registering, unloading and reloading do work independent of the number of adapters in the
store, counted (not timed): files opened and directories listed under the store (the
interpreter's audit events) and centroid entries the routing rebuild checked, at N = 5 and N = 150."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from bench.many_adapters import write_store
from router_core.artifacts import centroids_bytes
from router_core.store_rules import CENTROID_FILE
from server.app import create_app
from server.state import app_state
from tests.conftest import ADMIN
from tests.tiny import TINY_CONFIG, app_settings


class StoreIO:
    """Counts `open` (reads and writes apart) and directory listings under one folder while on."""

    def __init__(self) -> None:
        self.root: str | None = None
        self.reads = self.writes = self.listings = 0
        sys.addaudithook(self._hook)  # hooks cannot be removed: `root` None turns it off

    def _hook(self, event: str, args: tuple) -> None:
        root = self.root
        if root is None or event not in ("open", "os.scandir", "os.listdir"):
            return
        path = args[0] if args else None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).startswith(root):
            return
        if event != "open":
            self.listings += 1
            return
        mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR))
        if writing:
            self.writes += 1
        else:
            self.reads += 1

    def take(self) -> tuple[int, int, int]:
        out = (self.reads, self.writes, self.listings)
        self.reads = self.writes = self.listings = 0
        return out


IO = StoreIO()


def _store(root: Path, n: int) -> Path:
    store = root / f"store{n}"
    names = write_store(store, n, TINY_CONFIG["n_layer"], TINY_CONFIG["n_embd"], rank=2, distinct_files=n)
    write_store(store, 1, TINY_CONFIG["n_layer"], TINY_CONFIG["n_embd"], rank=2, prefix="extra", manifest=False)
    g = torch.Generator().manual_seed(0)
    for name in [*names, "extra00000"]:  # every adapter routable: the centroid router holds all of them
        c = torch.nn.functional.normalize(torch.randn(1, TINY_CONFIG["n_embd"], generator=g), dim=-1)
        (store / name / CENTROID_FILE).write_bytes(centroids_bytes(c, "base"))
    return store


def _costs(tiny_model_dir: Path, store: Path) -> dict[str, tuple]:
    out = {}
    with TestClient(create_app(app_settings(tiny_model_dir, store))) as client:
        services = app_state(client.app).services
        assert services is not None
        routing = services.routing
        assert client.post("/admin/reload", headers=ADMIN).json()["loaded"] == ["extra00000"]  # now all registered
        IO.root = str(store.resolve())
        try:
            for step, call in (("register", lambda: client.post("/admin/adapters", headers=ADMIN,
                                                                json={"name": "new", "path": "extra00000"})),
                               ("unload", lambda: client.delete("/admin/adapters/new", headers=ADMIN)),
                               ("reload", lambda: client.post("/admin/reload", headers=ADMIN))):
                IO.take()
                before = routing.entries_rebuilt
                r = call()
                assert r.status_code == 200, r.text
                out[step] = (*IO.take(), routing.entries_rebuilt - before)
            assert r.json()["loaded"] == [] and r.json()["replaced"] == []  # the reload found nothing changed
        finally:
            IO.root = None
    return out


def test_register_unload_reload_work_does_not_grow_with_n(tmp_path, tiny_model_dir):
    small, large = _costs(tiny_model_dir, _store(tmp_path, 5)), _costs(tiny_model_dir, _store(tmp_path, 150))
    # (files read, files written, directories listed, centroid entries rebuilt)
    assert small["register"] == large["register"]
    assert small["unload"] == large["unload"]
    reads, writes, _, rebuilt = large["register"]
    assert rebuilt == 1 and writes == 2 and reads <= 4, large  # one adapter checked; the journal append and its lock file
    assert large["unload"][1] == 2 and large["unload"][3] == 0, large
    # a reload with nothing changed reads, writes and rebuilds nothing; it lists each folder once
    # to see whether it changed (the one part that grows with N: a directory listing per adapter)
    for costs, n in ((small, 5), (large, 150)):
        assert costs["reload"][0] == costs["reload"][1] == costs["reload"][3] == 0, costs
        assert costs["reload"][2] == n + 2  # the store, then each of its n + 1 folders
