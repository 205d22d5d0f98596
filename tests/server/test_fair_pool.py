"""Per-request fairness when tokenising (issue 23, item 3): a request with one short job waits for
at most one job per worker, not for every job heavier requests queued before it."""

from __future__ import annotations

import threading
import time

import pytest

from server.serving.fair_pool import FairPool


def test_a_small_request_is_served_between_a_heavy_ones_jobs():
    pool = FairPool(1)
    order: list[str] = []
    gate = threading.Event()

    def job(name: str) -> str:
        if name == "heavy-0":
            gate.wait(10)  # holds the worker until every request has queued its work
        order.append(name)
        return name

    heavy = [threading.Thread(target=lambda i=i: pool.run("heavy", job, f"heavy-{i}")) for i in range(6)]
    for t in heavy:
        t.start()
        time.sleep(0.02)  # in submission order
    small = threading.Thread(target=lambda: pool.run("small", job, "small"))
    small.start()
    time.sleep(0.05)
    gate.set()
    for t in [*heavy, small]:
        t.join(10)
    assert order.index("small") <= 2, order  # FIFO would have made it last (index 6)
    assert sorted(order) == sorted([f"heavy-{i}" for i in range(6)] + ["small"])


def test_errors_reach_their_caller_and_the_pool_goes_on():
    pool = FairPool(2)
    with pytest.raises(ValueError, match="bad"):
        pool.run("a", lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert pool.run("b", lambda x: x + 1, 1) == 2
