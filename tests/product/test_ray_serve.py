"""Switchboard on a local Ray cluster (`ray.init` on this machine: loopback, no dashboard, a few
logical CPUs): two replicas of the tiny model behind Ray Serve's proxy converge on an adapter
registered once, place requests for an adapter on the replica holding it, and survive one
replica's actor being killed without losing a request that had not started streaming."""

from __future__ import annotations

import asyncio
import os
import re
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed (pip install 'lora-switchboard[ray]')")

from tests.conftest import ADMIN  # noqa: E402
from tests.live import free_port, wait_until  # noqa: E402
from tests.tiny import app_settings, make_adapter  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
APP = "switchboard"
REPLICA = "x-switchboard-replica"
PROMPT = {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    """Yield (proxy URL, store). Ray runs in this process' cluster for the module, then shuts down."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    import ray
    from ray import serve

    from server.commands.ray_serve import build_app

    store = tmp_path_factory.mktemp("ray-store") / "adapters"
    store.mkdir()
    make_adapter(tiny_model_dir, store / "alpha", seed=1, rank=4)
    make_adapter(tiny_model_dir, store / "beta", seed=2, rank=8, targets=("c_attn", "c_fc"))
    # Ray's own control-plane ports follow Ray's defaults (token-authenticated); the proxy and all
    # of this test's traffic stay on 127.0.0.1.
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = app_settings(tiny_model_dir, store, store={"watch_store": 0.5})
        serve.run(build_app(settings, replicas=2, num_cpus=1), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _get(f"{base}/ready") == 200, timeout=120, what="the proxy answering")
        yield base, store
    finally:
        serve.shutdown()
        ray.shutdown()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return 0


def _complete(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={**PROMPT, **body}, timeout=60)


def _replica_values(base: str, metric: str) -> dict[str, float]:
    """{replica: value} of one unlabelled-by-anything-else series in the merged scrape."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{metric}{{replica="([^"]+)"}} (\S+)$', text, re.MULTILINE)}


def test_adapter_registered_once_is_served_by_both_replicas(cluster, tiny_model_dir):
    base, store = cluster
    wait_until(lambda: len(_replica_values(base, "switchboard_adapters_loaded")) == 2, timeout=60,
               what="both replicas in the merged metrics")
    make_adapter(tiny_model_dir, store / "v" / "gamma", seed=3, rank=4)
    r = httpx.post(f"{base}/admin/adapters", headers=ADMIN, json={"name": "gamma", "path": "v/gamma"}, timeout=60)
    assert r.status_code == 200, r.text  # registered through one replica
    wait_until(lambda: set(_replica_values(base, "switchboard_adapters_loaded").values()) == {3.0}, timeout=30,
               what="both replicas registering gamma")
    # a mixture carries no adapter id: the least loaded replica takes it, so both end up serving gamma
    seen: dict[str, str] = {}
    for _ in range(40):
        r = _complete(base, model="auto", routing={"weights": {"gamma": 1.0}})
        assert r.status_code == 200, r.text
        seen[r.headers[REPLICA]] = r.json()["choices"][0]["text"]
        if len(seen) == 2:
            break
    assert len(seen) == 2, f"40 mixtures all went to {set(seen)}"
    assert len(set(seen.values())) == 1  # the same adapter weights on both
    # every replica's routing metrics reach one scrape, each under its replica label (pushed every second)
    wait_until(lambda: all(re.search(rf'switchboard_generated_tokens_total{{adapter="gamma",replica="{r}"}} [1-9]',
                                     httpx.get(f"{base}/metrics", timeout=10).text) for r in seen),
               timeout=30, what="gamma's tokens from both replicas in the merged metrics")


def test_requests_for_an_adapter_go_to_the_replica_holding_it(cluster):
    base, _ = cluster
    first = _complete(base, model="alpha")
    assert first.status_code == 200, first.text
    holder = first.headers[REPLICA]
    # the replica reports the adapters it holds every 0.1 s, through Ray's controller to the ingress's
    # router; give that a moment, or the next request would go to the replica holding the fewest
    time.sleep(2.0)
    assert {_complete(base, model="alpha").headers[REPLICA] for _ in range(8)} == {holder}
    # an adapter no replica holds goes to the replica holding the fewest: the other one
    other = _complete(base, model="beta")
    assert other.status_code == 200 and other.headers[REPLICA] != holder
    time.sleep(2.0)
    assert {_complete(base, model="beta").headers[REPLICA] for _ in range(8)} == {other.headers[REPLICA]}


def test_killed_replica_heals_and_loses_no_unstarted_request(cluster):
    import ray

    base, _ = cluster
    long = {**PROMPT, "model": "alpha", "max_tokens": 100}
    expected = httpx.post(f"{base}/v1/completions", json=long, timeout=60).json()["choices"][0]["text"]
    holder = _complete(base, model="alpha").headers[REPLICA]
    actors = _replica_actors()
    assert holder in actors and len(actors) == 2

    async def scenario():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            async with client.stream("POST", "/v1/completions", json={
                    "model": "alpha", "prompt": "x", "max_tokens": 110, "temperature": 0, "stream": True}) as stream:
                assert stream.headers[REPLICA] == holder
                lines = stream.aiter_lines()
                async for line in lines:
                    if line.startswith("data: {"):
                        break  # streaming has started on the holder
                # requests that have not started streaming (non-streaming ones answer at the end), sent to
                # the holder of alpha; the kill lands while they run there or wait to be routed
                burst = [asyncio.create_task(client.post("/v1/completions", json=long)) for _ in range(8)]
                await asyncio.sleep(0.3)
                ray.kill(ray.get_actor(actors[holder], namespace="serve"), no_restart=True)
                tail = [line async for line in lines]
            return tail, await asyncio.gather(*burst)

    tail, burst = asyncio.run(scenario())
    # the stream that had started either finished before the kill landed or ends with a visible error
    last = [line for line in tail if line][-1]
    assert last == "data: [DONE]" or '"replica_lost"' in last, tail[-3:]
    # none of the requests that had not started streaming is lost
    assert [r.status_code for r in burst] == [200] * 8, [r.text for r in burst if r.status_code != 200]
    assert {r.json()["choices"][0]["text"] for r in burst} == {expected}
    retried = sum(int(r.headers.get("x-switchboard-tries", "1")) > 1 for r in burst)
    print(f"burst after the kill: {retried}/8 retried on another replica; the started stream ended with {last[:80]!r}")
    # Ray Serve replaces the replica; the new one restores the store and serves
    wait_until(lambda: len(_replica_actors()) == 2 and holder not in _replica_actors(), timeout=120,
               what="Ray Serve starting a replacement replica")
    wait_until(lambda: len(_replica_values(base, "switchboard_adapters_loaded")) == 2
               and holder not in _replica_values(base, "switchboard_adapters_loaded"), timeout=60,
               what="the replacement in the merged metrics")
    assert set(_replica_values(base, "switchboard_adapters_loaded").values()) == {3.0}  # alpha, beta, gamma


def _replica_actors() -> dict[str, str]:
    """{replica id: actor name} of the live Switchboard replicas."""
    import ray

    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith(f"SERVE_REPLICA::{APP}#SwitchboardReplica#"):
            try:
                if ray.get_actor(name, namespace=actor["namespace"]):
                    out[name.rsplit("#", 1)[1]] = name
            except ValueError:
                pass
    return out
