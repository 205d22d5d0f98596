"""Issue 23's "done when" on a real server: every reproduction of the second fuzz and fault pass
gets its 4xx (or 507) while six other streams run, and the six finish with the same text as on
an idle server, every adapter reference back at 0."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import httpx
import torch
from safetensors.torch import load_file, save_file

from server.store.manifest import Manifest
from tests.conftest import ADMIN
from tests.handle import AppHandle
from tests.live import live_server, wait_until
from tests.product.test_isolation_live import _finished_normally, _slow_engine, _sse, _stream, six_streams
from tests.server.test_isolation_round2 import REPRODUCTIONS_2
from tests.server.test_store_durability import full_disk_write
from tests.tiny import app_settings


def test_done_when_round2_reproductions_refused_while_six_streams_finish(tiny_model_dir, store, monkeypatch):
    shutil.copytree(store / "alpha", store / "loud")  # item 1: lora_A rescaled to 1e38, finite in fp32
    tensors = load_file(store / "loud" / "adapter_model.safetensors")
    save_file({k: (torch.full_like(v, 1e38) if "lora_A" in k else v) for k, v in tensors.items()},
              store / "loud" / "adapter_model.safetensors")
    (store / "_manifest.json").write_text(json.dumps({"adapters": [{"name": "alpha", "path": "alpha"},
                                                                   {"name": "beta", "path": "beta"}]}))
    with live_server(app_settings(tiny_model_dir, store)) as (base, app):
        streams = six_streams()
        idle = [_sse(base, body) for body in streams]
        assert all(_finished_normally(s, lines, 40) for s, lines in idle)
        _slow_engine(app, monkeypatch, 0.01)
        real_write, full_disk = os.write, full_disk_write(store)  # item 4: the store's files cannot take a byte

        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                running = [asyncio.create_task(_stream(client, body)) for body in streams]
                engine = AppHandle(app).engine
                while len(engine.running) < 6:
                    await asyncio.sleep(0.01)
                got = []
                for path, body, status, _ in REPRODUCTIONS_2:
                    r = await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
                    got.append((path, r.status_code, status))
                r = await client.post("/admin/adapters", json={"name": "loud", "path": "loud"}, headers=ADMIN)
                got.append(("loud", r.status_code, 400))
                monkeypatch.setattr(os, "write", full_disk)
                try:
                    for method, path, body in [("POST", "/admin/adapters", {"name": "gamma", "path": "beta"}),
                                               ("DELETE", "/admin/adapters/beta", None)]:
                        r = await client.request(method, path, json=body, headers=ADMIN)
                        got.append((path, r.status_code, 507))
                finally:
                    monkeypatch.setattr(os, "write", real_write)
                still_running = len(engine.running)
                return await asyncio.gather(*running), got, still_running

        results, got, still_running = asyncio.run(scenario())
        assert all(status == want for _, status, want in got), got
        assert still_running > 0, "the streams ended before the reproductions were sent"
        assert [_finished_normally(s, lines, 40) for s, lines in results] == [True] * 6
        texts = [[json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]] for _, lines in results]
        assert texts == [[json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]] for _, lines in idle]
        wait_until(lambda: AppHandle(app).idle(), what="every reference to be released")
        adapters = httpx.get(f"{base}/admin/adapters", headers=ADMIN).json()["adapters"]
        assert {a["name"]: a["in_flight"] for a in adapters} == {"alpha": 0, "beta": 0}
        assert set(Manifest(store).adapters) == {"alpha", "beta"}  # the registry = the manifest
