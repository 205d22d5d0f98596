"""A newcomer's first hour (issue 23): a missing base model is one clear message at once (no hub
retries) that names the installed hub client's command, and the demo's banner names the
interpreter that has the `openai` package."""

from __future__ import annotations

import os
import sys
import time

import pytest

from server.engine import base_model
from server.engine.errors import ModelLoadError


def test_missing_model_without_network_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(base_model, "hub_reachable", lambda *a, **k: False)
    import transformers

    def no_download(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            raise AssertionError("the hub was tried although it cannot be reached")
        raise OSError("not in the cache")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_download)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        base_model.load_base_model("gpt2-not-cached", "cpu", "float32")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "`hf download gpt2-not-cached`" in message and "huggingface-cli" not in message
    assert "Hugging Face cache" in message and "--base-model /path/to/folder" in message


def test_a_local_folder_never_asks_the_hub(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(base_model, "hub_reachable", lambda *a, **k: pytest.fail("probed the hub for a folder"))
    assert base_model.load_base_model(str(tiny_model_dir), "cpu", "float32").max_positions == 128


def test_banner_names_this_interpreter(monkeypatch, tmp_path):
    from server.commands.demo import banner, python_command
    from server.settings import Settings

    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    assert python_command() == os.path.join(".venv", "bin", "python")
    assert ".venv/bin/python -c 'from openai import OpenAI" in banner(Settings(), ["a"])
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    assert python_command() == "/usr/bin/python3"
