"""A safetensors file read straight into memory its caller chose: the header parsed and checked,
then every tensor's bytes read once, in one `preadv`, to the offset `place` chose for it in the
buffer `place` gave.

Why not `safetensors.torch.load_file`: for an adapter's 72 small factors it made 72 tensors, one
call and one copy out of a memory map each (4.5 ms of the 6.5 MB rank-16 adapter of GPT-2 124M,
against ~1 ms for reading the bytes; docs/performance.md), and the register then copied every
factor once more into stacks of its own. Here the caller places the factors in stacks of one
buffer (`server.store.folder`), so the file's bytes land where the register works on them.

The header is checked as safetensors checks it: its length, a JSON object, every entry's dtype,
shape and byte range, the ranges tiling the data with no gap or overlap up to the file's end.
The format holds no code, so nothing here runs what it reads.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeGuard

import torch

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


class TensorFileError(ValueError):
    """The file is no readable safetensors file (the message says why)."""


class TensorInfo(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]


# name -> info of every tensor => (a contiguous uint8 CPU buffer, name -> where that tensor's bytes go in it)
Placer = Callable[[dict[str, TensorInfo]], tuple[torch.Tensor, dict[str, int]]]


def read_into(path: Path, max_bytes: int, place: Placer) -> None:
    """Read the file at `path` into the buffer `place` gives for its header, each tensor's bytes at
    the offset `place` chose (whatever `place` raises propagates, before any value is read): one
    `preadv` scattering the file's data straight into those places. OSError propagates."""
    with open(path, "rb", buffering=0) as fh:
        entries, start = _checked_header(fh, max_bytes)
        buf, offsets = place({name: info for _, name, info in entries})
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError("place must give a contiguous 1-D uint8 buffer")
        if sys.byteorder != "little":  # the format is little-endian: let safetensors swap the bytes
            from safetensors.torch import load_file

            for name, t in load_file(str(path)).items():
                o = offsets[name]
                buf[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
            return
        view, parts = memoryview(buf.numpy().data), []
        for nbytes, name, _ in entries:
            o = offsets[name]
            if not 0 <= o <= o + nbytes <= len(view):
                raise ValueError(f"place put {name!r} outside its buffer")
            if nbytes:
                parts.append(view[o:o + nbytes])
        for at in range(0, len(parts), _IOV_MAX):  # one system call per 1024 tensors
            chunk = parts[at:at + _IOV_MAX]
            want = sum(len(p) for p in chunk)
            if os.preadv(fh.fileno(), chunk, start) != want:
                raise TensorFileError("the file ended early: it changed while it was read")
            start += want


_IOV_MAX = 1024


def read_header(path: Path, max_bytes: int) -> dict[str, TensorInfo]:
    """Every tensor's dtype and shape, the header checked as `read_into` checks it; no value is read
    (what indexing a store at start needs)."""
    with open(path, "rb", buffering=0) as fh:
        entries, _ = _checked_header(fh, max_bytes)
    return {name: info for _, name, info in entries}


def _checked_header(fh, max_bytes: int) -> tuple[list[tuple[int, str, TensorInfo]], int]:
    size = os.fstat(fh.fileno()).st_size
    if size > max_bytes:
        raise TensorFileError(f"larger than {max_bytes >> 20} MiB")
    return _header(fh, size)


def _header(fh, size: int) -> tuple[list[tuple[int, str, TensorInfo]], int]:
    """(byte count, name, info) of every tensor in file order, and where the first one's bytes start."""
    head = fh.read(8)
    if len(head) < 8:
        raise TensorFileError("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise TensorFileError(f"header length {n} does not fit the file's {size} bytes")
    text = fh.read(n)
    if len(text) != n or not text.startswith(b"{"):
        raise TensorFileError("the header is not a JSON object")
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"the header does not parse: {e}") from None
    except RecursionError:
        raise TensorFileError("the header is nested too deeply to parse") from None
    if not isinstance(header, dict):
        raise TensorFileError("the header is not a JSON object")
    entries = sorted(_entry(name, info) for name, info in header.items() if name != "__metadata__")
    at, out = 0, []
    for begin, end, name, info in entries:
        if begin != at:
            raise TensorFileError(f"tensor {name!r}: bytes {begin}..{end} leave a gap or overlap at {at}")
        at = end
        out.append((end - begin, name, info))
    if 8 + n + at != size:
        raise TensorFileError(f"the tensors end at byte {8 + n + at}, the file at {size}")
    return out, 8 + n


def _entry(name: str, info: object) -> tuple[int, int, str, TensorInfo]:
    """(begin, end, name, info) of one header entry, its byte range matching its dtype and shape."""
    if not isinstance(info, dict):
        raise TensorFileError(f"tensor {name!r}: header entry is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if type(code) is not str or code not in DTYPES:
        raise TensorFileError(f"tensor {name!r}: dtype {code!r} is not supported")
    if not _sizes(shape):
        raise TensorFileError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (_sizes(offsets) and len(offsets) == 2):
        raise TensorFileError(f"tensor {name!r}: data_offsets {offsets!r} are not two byte offsets")
    begin, end = offsets
    dtype = DTYPES[code]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise TensorFileError(f"tensor {name!r}: bytes {begin}..{end} do not hold a {code} tensor of shape {shape}")
    return begin, end, name, TensorInfo(dtype, tuple(shape))


def _sizes(v: object) -> TypeGuard[list[int]]:
    """A JSON list of non-negative integers (not bools); checked at C speed, 72 entries a file."""
    return type(v) is list and set(map(type, v)) <= {int} and min(v, default=0) >= 0
