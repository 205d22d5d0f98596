"""The adapter store's rules (`router_core.store_rules`), and how the server and training report a
broken one in their own error types."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from router_core import store_rules
from router_core.store_rules import StoreRuleError, base_fingerprint, check_name, name_is_valid


@pytest.mark.parametrize("name", ["a", "code", "tier0", "v1.2-x_y", "A" * 64, "0lead"])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name and name_is_valid(name)


@pytest.mark.parametrize(
    "name",
    ["", "a" * 65, "-lead", ".hidden", "_routers", "a/b", "a:b", "a b", "auto", "BASE", "Auto", "code\n", None, 3],
)
def test_refused_names(name: object) -> None:
    assert not name_is_valid(name)
    with pytest.raises(StoreRuleError, match="invalid adapter name"):
        check_name(name)


def test_server_and_training_raise_their_own_errors_with_the_same_message() -> None:
    from server.engine.errors import InvalidRequest
    from server.store.folder import check_name as server_check
    from training.store import TrainingError
    from training.store import check_name as training_check

    with pytest.raises(StoreRuleError) as rule:
        check_name("auto")
    with pytest.raises(InvalidRequest) as http:
        server_check("auto", param="lora_name")
    with pytest.raises(TrainingError) as cli:
        training_check("auto")
    assert http.value.message == cli.value.args[0] == str(rule.value)
    assert http.value.param == "lora_name"


def test_reserved_folders_are_not_adapter_names() -> None:
    """The store's own folders can never collide with an adapter's."""
    for folder in (store_rules.ROUTERS_DIR, store_rules.WORK_DIR, store_rules.MANIFEST_FILE):
        assert not name_is_valid(folder)


def test_fingerprint_depends_on_shapes_not_values_or_dtype(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fp = base_fingerprint(model)
    assert len(fp) == 64 and int(fp, 16) >= 0
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir).half()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert base_fingerprint(other) == fp
    model.resize_token_embeddings(model.config.vocab_size + 8)
    assert base_fingerprint(model) != fp


def test_device_resolution() -> None:
    assert store_rules.resolve_device("cpu") == torch.device("cpu")
    assert store_rules.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        from server.engine.base_model import resolve_device
        from server.engine.errors import ModelLoadError
        from training.store import TrainingError, pick_device

        with pytest.raises(StoreRuleError, match="CUDA is not available"):
            store_rules.resolve_device("cuda")
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda:0")
        with pytest.raises(TrainingError, match="--device: .*CUDA is not available"):
            pick_device("cuda")
