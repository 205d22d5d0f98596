"""Fixtures shared by the live-server client tests."""

from __future__ import annotations

import pytest

from tests.live import ClientServer, client_server


@pytest.fixture(scope="module")
def live_clients(tmp_path_factory) -> ClientServer:
    """One live server per test module, built the same way for every real-client test
    (`tests.live.client_server`)."""
    with client_server(tmp_path_factory.mktemp("clients")) as server:
        yield server
