"""The bench's GGUF writer (`bench.gguf`, what the llama.cpp comparison loads) read back by an
independent parser of the GGUF v3 layout: header, metadata, tensor infos in ggml's dimension
order, aligned offsets, f16 values and q8_0 blocks. llama.cpp itself is not installed in CI, so
this checks the file against the spec, not against llama.cpp's loader; and the llama.cpp section
says it skipped when `llama_cpp` is not importable."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from bench import gguf
from tests.tiny import build_model

TYPES = {4: "<I", 5: "<i", 6: "<f"}


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        out = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.take("<Q")
        s = self.data[self.pos:self.pos + n].decode()
        self.pos += n
        return s

    def value(self, t: int):
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.take("<I"), self.take("<Q")
            return [self.value(et) for _ in range(n)]
        return self.take(TYPES[t])


def read(path):
    r = Reader(path.read_bytes())
    magic, version, n_tensors, n_kv = r.take("<IIQQ")
    assert magic == 0x46554747 and version == 3
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        ne = [r.take("<Q") for _ in range(r.take("<I"))]
        infos.append((name, ne, r.take("<I"), r.take("<Q")))
    start = r.pos + (-r.pos) % meta["general.alignment"]
    return meta, infos, r.data, start


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gpt2_gguf_reads_back(tmp_path, kind):
    model, tokenizer = build_model()
    path = gguf.write_gpt2(model, tmp_path / f"m-{kind}.gguf", kind, *gguf.tokenizer_vocab(tokenizer))
    meta, infos, data, start = read(path)
    cfg = model.config
    assert meta["general.architecture"] == "gpt2" and meta["general.file_type"] == gguf.FILE_TYPE[kind]
    assert meta["gpt2.block_count"] == cfg.n_layer and meta["gpt2.embedding_length"] == cfg.n_embd
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size == len(meta["tokenizer.ggml.token_type"])
    assert meta["tokenizer.ggml.merges"] and all(" " in m for m in meta["tokenizer.ggml.merges"])
    names = [n for n, *_ in infos]
    assert len(names) == 2 + 12 * cfg.n_layer + 3 and "output.weight" in names
    by_name = {n: (ne, t, off) for n, ne, t, off in infos}
    sd = model.state_dict()
    # c_attn is Conv1D [in, out]; GGUF holds [out, in], i.e. ne = (in, out)
    ne, gtype, off = by_name["blk.0.attn_qkv.weight"]
    assert ne == [cfg.n_embd, 3 * cfg.n_embd] and off % 32 == 0
    want = sd["transformer.h.0.attn.c_attn.weight"].t().float().numpy()  # [out, in]
    count = want.size
    if kind == "f16":
        assert gtype == gguf.GGML_F16
        got = np.frombuffer(data, np.float16, count, start + off).reshape(want.shape).astype(np.float32)
        assert np.allclose(got, want, atol=1e-3, rtol=1e-3)
    else:
        assert gtype == gguf.GGML_Q8_0
        blocks = np.frombuffer(data, [("d", "<f2"), ("qs", "i1", (32,))], count // 32, start + off)
        got = (blocks["d"].astype(np.float32)[:, None] * blocks["qs"]).reshape(want.shape)
        step = np.abs(want.reshape(-1, 32)).max(axis=1) / 127
        assert (np.abs(got - want).reshape(-1, 32) <= step[:, None] * 0.51 + 1e-4).all()
    ne, gtype, off = by_name["blk.0.attn_qkv.bias"]
    assert gtype == gguf.GGML_F32 and ne == [3 * cfg.n_embd]
    bias = np.frombuffer(data, np.float32, 3 * cfg.n_embd, start + off)
    assert np.array_equal(bias, sd["transformer.h.0.attn.c_attn.bias"].numpy())


def test_llamacpp_section_skips_without_the_package(monkeypatch):
    from bench import llamacpp
    from bench.common import BenchConfig

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    out = llamacpp.run(BenchConfig.make(tiny=True, device="cpu"), assets=None, decode={})
    assert out == {"skipped": llamacpp.SKIP}
