"""Centroid files and sentence-encoder folders: round trips and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from router_core import ArtifactError, load_centroids, load_sentence_encoder, save_centroids
from router_core.artifacts import default_sentence_encoder_path
from router_core.complexity import load_spacy_pipeline
from tests.conftest import require_minilm, require_spacy


def test_centroids_round_trip(tmp_path: Path) -> None:
    c = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    path = save_centroids(tmp_path / "a" / "centroid.safetensors", c, "minilm:all-MiniLM-L6-v2")
    loaded, embedder_id = load_centroids(path)
    assert embedder_id == "minilm:all-MiniLM-L6-v2"
    assert torch.allclose(loaded, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    save_centroids(path, torch.tensor([1.0, 1.0]), "base")  # a single [d] vector, overwritten
    loaded, embedder_id = load_centroids(path)
    assert loaded.shape == (1, 2) and embedder_id == "base"


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        ({"other": torch.ones(1, 3)}, {"embedder_id": "base"}, "no tensor named 'centroids'"),
        ({"centroids": torch.ones(1, 3)}, None, "embedder_id"),
        ({"centroids": torch.ones(2, 3, 4)}, {"embedder_id": "base"}, r"\[m, d\]"),
        ({"centroids": torch.ones(0, 3)}, {"embedder_id": "base"}, r"\[m, d\]"),
        ({"centroids": torch.tensor([[float("nan"), 1.0]])}, {"embedder_id": "base"}, "NaN"),
        ({"centroids": torch.zeros(1, 3)}, {"embedder_id": "base"}, "all zeros"),
        ({"centroids": torch.ones(1, 3, dtype=torch.int64)}, {"embedder_id": "base"}, "floating"),
    ],
)
def test_bad_centroid_files(tmp_path: Path, tensors: dict, metadata: dict | None, message: str) -> None:
    path = tmp_path / "centroid.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ArtifactError, match=message):
        load_centroids(path)


def test_centroid_file_missing_or_not_safetensors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_centroids(tmp_path / "nope.safetensors")
    path = tmp_path / "centroid.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip/pickle, not safetensors")
    with pytest.raises(ArtifactError, match="not a readable safetensors") as info:
        load_centroids(path)
    assert info.value.__cause__ is not None


def test_save_centroids_validates(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError):
        save_centroids(tmp_path / "c.safetensors", torch.zeros(2, 3), "base")
    with pytest.raises(ArtifactError):
        save_centroids(tmp_path / "c.safetensors", torch.ones(2, 3), "")
    assert not (tmp_path / "c.safetensors").exists()


def test_centroid_file_keeps_the_examples_form_group(tmp_path: Path) -> None:
    """The form group of the examples a centroid came from (router_core.form) is saved beside it,
    by file and as bytes, and read back; a file without one reads None; a bad value is refused."""
    from safetensors.torch import load

    from router_core.artifacts import centroids_bytes, load_centroid_file

    c = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    save_centroids(tmp_path / "a.safetensors", c, "minilm:x", example_form="prose")
    got, embedder, form = load_centroid_file(tmp_path / "a.safetensors")
    assert torch.allclose(got, c) and embedder == "minilm:x" and form == "prose"
    (tmp_path / "b.safetensors").write_bytes(centroids_bytes(c, "minilm:x", "request"))
    assert load_centroid_file(tmp_path / "b.safetensors")[2] == "request"
    assert torch.equal(load(centroids_bytes(c, "minilm:x"))["centroids"], load(centroids_bytes(c, "minilm:x", "code"))["centroids"])
    save_centroids(tmp_path / "c.safetensors", c, "minilm:x")
    assert load_centroid_file(tmp_path / "c.safetensors")[2] is None
    with pytest.raises(ArtifactError, match="example_form must be one of"):
        centroids_bytes(c, "minilm:x", "poetry")
    save_file({"centroids": c}, str(tmp_path / "d.safetensors"),
              metadata={"embedder_id": "minilm:x", "example_form": "poetry"})
    with pytest.raises(ArtifactError, match="example_form must be one of"):
        load_centroid_file(tmp_path / "d.safetensors")


def test_sentence_encoder_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_sentence_encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no config.json"):
        load_sentence_encoder(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ArtifactError, match="cannot load") as info:
        load_sentence_encoder(broken)
    assert info.value.__cause__ is not None
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "bert"}')
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ArtifactError, match="safetensors required"):
        load_sentence_encoder(pickled)


def test_default_sentence_encoder_path() -> None:
    path = require_minilm()
    assert path == default_sentence_encoder_path() and (Path(path) / "config.json").is_file()


def test_spacy_loader_error_is_chained() -> None:
    require_spacy()
    with pytest.raises(ArtifactError, match="no_such_pipeline") as info:
        load_spacy_pipeline("no_such_pipeline")
    assert info.value.__cause__ is not None
