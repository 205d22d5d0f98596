"""`server.store.tensor_file.read_into`: a safetensors file read straight into the places its
caller chose gives the tensors safetensors itself reads, and every header safetensors refuses
is refused with a `TensorFileError` before any value is read."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.store.tensor_file import TensorFileError, TensorInfo, read_into


def _placed(infos: dict[str, TensorInfo]) -> tuple[torch.Tensor, dict[str, int], dict[str, int]]:
    """A buffer with the tensors in reverse name order, 3 spare bytes in front (so offsets are
    not the file's); returns (buffer, offsets, byte sizes)."""
    sizes = {n: torch.Size(i.shape).numel() * i.dtype.itemsize for n, i in infos.items()}
    offsets, at = {}, 3
    for name in sorted(infos, reverse=True):
        at += -at % 8  # aligned for any dtype
        offsets[name], at = at, at + sizes[name]
    return torch.zeros(at, dtype=torch.uint8), offsets, sizes


def _read(path) -> dict[str, torch.Tensor]:
    got = {}

    def place(infos):
        buf, offsets, sizes = _placed(infos)
        got.update({n: (buf, offsets[n], sizes[n], infos[n]) for n in infos})
        return buf, offsets

    read_into(path, 1 << 30, place)
    return {n: buf[o:o + s].view(i.dtype).view(i.shape) for n, (buf, o, s, i) in got.items()}


def test_mixed_dtypes_and_shapes_read_as_safetensors_reads_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).half(),
        "c": torch.randn(2, 2, 3, generator=g).bfloat16(), "d": torch.randn(4, 1, generator=g).double(),
        "e": torch.arange(6, dtype=torch.int32).view(2, 3), "f": torch.tensor(2.5), "g": torch.empty(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    got, want = _read(tmp_path / "t.safetensors"), load_file(tmp_path / "t.safetensors")
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


def _file(tmp_path, header: object, data: bytes = b"", *, length: int | None = None, raw: bytes | None = None):
    text = raw if raw is not None else json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,data,kw,message", [
    ({"x": F32}, b"\0" * 8, {"length": 1 << 40}, "header length"),
    (None, b"", {"raw": b"[1, 2]"}, "not a JSON object"),
    (None, b"", {"raw": b"{not json"}, "does not parse"),
    ({"x": F32}, b"\0" * 4, {}, "end at byte"),  # the file is shorter than its tensors
    ({"x": F32}, b"\0" * 12, {}, "end at byte"),  # bytes past the last tensor
    ({"x": F32, "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, {}, "gap or overlap"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, {}, "gap or overlap"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, {}, "do not hold"),
    ({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, {}, "not supported"),
    ({"x": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, {}, "not supported"),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, {}, "not a list of sizes"),
    ({"x": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8, {}, "not a list of sizes"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, {}, "two byte offsets"),
    ({"x": [1, 2]}, b"", {}, "not an object"),
])
def test_bad_headers_are_refused_before_anything_is_placed(tmp_path, header, data, kw, message):
    placed = []
    with pytest.raises(TensorFileError, match=message):
        read_into(_file(tmp_path, header, data, **kw), 1 << 30, lambda infos: placed.append(infos) or (None, {}))
    assert not placed


def test_a_file_over_the_limit_is_refused(tmp_path):
    save_file({"x": torch.zeros(64)}, tmp_path / "t.safetensors")
    with pytest.raises(TensorFileError, match="larger than"):
        read_into(tmp_path / "t.safetensors", 100, lambda infos: (torch.zeros(0, dtype=torch.uint8), {}))
