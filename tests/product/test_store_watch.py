"""`--watch-store`: two plain servers on one store converge on admin changes made through either,
through the admin API's validation path, without failing a request in flight. Loopback, bounded."""

from __future__ import annotations

import json
import shutil
import threading
from contextlib import ExitStack

import httpx

from server.store.manifest import Manifest
from tests.conftest import ADMIN
from tests.live import engine_paused, live_server, wait_until
from tests.tiny import app_settings, make_adapter

WATCH = 0.2  # seconds between polls


def _servers(tiny_model_dir, store, stack: ExitStack):
    settings = app_settings(tiny_model_dir, store, store={"watch_store": WATCH})
    return [stack.enter_context(live_server(settings)) for _ in range(2)]


def _adapters(base: str) -> dict[str, dict]:
    return {a["name"]: a for a in httpx.get(f"{base}/admin/adapters", headers=ADMIN).json()["adapters"]}


def _complete(base: str, model: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=60,
                      json={"model": model, "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0})


def test_admin_changes_on_one_server_reach_the_other(tiny_model_dir, store):
    make_adapter(tiny_model_dir, store / "v" / "gamma-v1", seed=3, rank=4)  # below the top: not scanned at start
    make_adapter(tiny_model_dir, store / "v" / "gamma-v2", seed=4, rank=2, targets=("c_fc",))
    with ExitStack() as stack:
        (a, app_a), (b, app_b) = _servers(tiny_model_dir, store, stack)
        assert set(_adapters(b)) == {"alpha", "beta"}
        # addition
        r = httpx.post(f"{a}/admin/adapters", headers=ADMIN, json={"name": "gamma", "path": "v/gamma-v1"})
        assert r.status_code == 200, r.text
        wait_until(lambda: "gamma" in _adapters(b), timeout=30, what="server B registering gamma")
        assert _complete(b, "gamma").json()["choices"][0]["text"] == _complete(a, "gamma").json()["choices"][0]["text"]
        # replacement, made through B this time: A follows
        before = _complete(a, "gamma").json()["choices"][0]["text"]
        r = httpx.post(f"{b}/admin/adapters", headers=ADMIN, json={"name": "gamma", "path": "v/gamma-v2"})
        assert r.status_code == 200, r.text
        wait_until(lambda: _adapters(a)["gamma"]["path"] == "gamma-v2", timeout=30, what="server A replacing gamma")
        assert _adapters(a)["gamma"]["rank"] == 2
        after = _complete(a, "gamma").json()["choices"][0]["text"]
        assert after == _complete(b, "gamma").json()["choices"][0]["text"] and after != before
        # removal (vLLM alias on A): B stops serving it with the admin API's 404
        r = httpx.post(f"{a}/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "gamma"})
        assert r.status_code == 200, r.text
        wait_until(lambda: "gamma" not in _adapters(b), timeout=30, what="server B removing gamma")
        assert _complete(b, "gamma").status_code == 404
        events = httpx.get(f"{b}/metrics").text
        assert 'switchboard_adapter_events_total{event="replace"} 1.0' in events
        assert 'switchboard_adapter_events_total{event="unload"} 1.0' in events
        # the watchers applied the manifest without writing it back: it lists what the API left
        assert sorted(Manifest(store).adapters) == ["alpha", "beta"]


def test_removal_waits_for_the_request_in_flight(tiny_model_dir, store):
    with ExitStack() as stack:
        (a, _), (b, app_b) = _servers(tiny_model_dir, store, stack)
        registry = app_b.state.switchboard.registry
        expected = _complete(b, "beta").json()["choices"][0]["text"]
        result: dict = {}
        with engine_paused(app_b):
            thread = threading.Thread(target=lambda: result.update(r=_complete(b, "beta")))
            thread.start()
            held = registry.get("beta")
            wait_until(lambda: held.refcount == 1, what="the request holding beta on B")
            assert httpx.delete(f"{a}/admin/adapters/beta", headers=ADMIN).status_code == 200
            wait_until(lambda: "beta" not in registry, timeout=30, what="server B removing beta")
            assert _complete(b, "beta").status_code == 404  # new requests: gone
            assert held.refcount == 1 and held.retired  # the one in flight keeps its version
        thread.join(60)
        assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == expected
        wait_until(lambda: held.refcount == 0, what="the reference released")


def test_refused_folder_changes_nothing_until_it_is_fixed(tiny_model_dir, store):
    """A manifest naming a half-synced folder (here: no weights yet) is refused by the same
    validation as the API; the server keeps serving what it had, then picks the folder up once it
    is complete."""
    with ExitStack() as stack:
        (a, _), (b, _) = _servers(tiny_model_dir, store, stack)
        make_adapter(tiny_model_dir, store / "delta-full", seed=5)
        (store / "delta").mkdir()
        shutil.copy(store / "delta-full" / "adapter_config.json", store / "delta")
        r = httpx.post(f"{a}/admin/adapters", headers=ADMIN, json={"name": "delta", "path": "delta"})
        assert r.status_code == 400  # the API refuses it: the manifest is unchanged
        manifest = json.loads((store / "_manifest.json").read_text())
        manifest["adapters"].append({"name": "delta", "path": "delta", "pinned": False})
        (store / "_manifest.json").write_text(json.dumps(manifest))  # e.g. a sync that ran ahead of the folder
        wait_until(lambda: 'switchboard_adapter_events_total{event="fail"}' in httpx.get(f"{b}/metrics").text,
                   timeout=30, what="server B refusing delta")
        assert "delta" not in _adapters(b) and set(_adapters(b)) == {"alpha", "beta"}
        assert _complete(b, "alpha").status_code == 200
        shutil.copy(store / "delta-full" / "adapter_model.safetensors", store / "delta")
        wait_until(lambda: "delta" in _adapters(b) and "delta" in _adapters(a), timeout=30, what="delta picked up")
        fails = [ln for ln in httpx.get(f"{b}/metrics").text.splitlines() if 'event="fail"' in ln]
        assert fails == ['switchboard_adapter_events_total{event="fail"} 1.0']  # refused once, not every poll


def test_changes_through_both_servers_both_survive(tiny_model_dir, store):
    make_adapter(tiny_model_dir, store / "v" / "gamma", seed=3)
    make_adapter(tiny_model_dir, store / "v" / "delta", seed=4)
    with ExitStack() as stack:
        (a, _), (b, _) = _servers(tiny_model_dir, store, stack)
        results = []
        threads = [threading.Thread(target=lambda s=s, n=n: results.append(
            httpx.post(f"{s}/admin/adapters", headers=ADMIN, json={"name": n, "path": f"v/{n}"}).status_code))
            for s, n in ((a, "gamma"), (b, "delta"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [200, 200]
        for base in (a, b):
            wait_until(lambda base=base: set(_adapters(base)) == {"alpha", "beta", "gamma", "delta"}, timeout=30,
                       what=f"{base} converging")


def test_on_demand_refresh_between_polls(tiny_model_dir, store):
    """A server asked for an adapter it does not know can poll at once (what a Ray replica does
    before answering 404), but not more often than `min_age` however many requests ask."""
    import asyncio

    make_adapter(tiny_model_dir, store / "v" / "gamma", seed=3)
    make_adapter(tiny_model_dir, store / "v" / "delta", seed=4)
    settings = app_settings(tiny_model_dir, store, store={"watch_store": 3600})  # no periodic poll in this test
    with ExitStack() as stack:
        (a, _), (b, app_b) = [stack.enter_context(live_server(settings)) for _ in range(2)]
        watcher, registry = app_b.state.store_watcher, app_b.state.switchboard.registry
        loop = watcher._task.get_loop()

        def refresh(min_age: float) -> None:
            asyncio.run_coroutine_threadsafe(watcher.refresh(min_age), loop).result(60)

        assert httpx.post(f"{a}/admin/adapters", headers=ADMIN, json={"name": "gamma", "path": "v/gamma"}).status_code == 200
        assert "gamma" not in registry
        refresh(0)
        assert "gamma" in registry
        assert httpx.post(f"{a}/admin/adapters", headers=ADMIN, json={"name": "delta", "path": "v/delta"}).status_code == 200
        refresh(3600)  # the last poll is too recent: nothing happens
        assert "delta" not in registry
        refresh(0)
        assert "delta" in registry
