"""Write a GPT-2 (HF `GPT2LMHeadModel`) as a GGUF v3 file, f16 or q8_0, for llama.cpp.

The layout follows llama.cpp's GGUF spec (ggml/docs/gguf.md) and the tensor names and
transposes of its `convert_hf_to_gguf.py` for GPT-2: Conv1D weights (`[in, out]`) are written as
`[out, in]` matrices, the tied head as `output.weight`, norms and biases in f32. q8_0 is
llama.cpp's block format: blocks of 32 values, an f16 scale `d = amax / 127` and 32 int8s.
Written here (numpy only) so the bench needs nothing beyond `llama-cpp-python` itself; the
tokenizer written is the bench's, padded with unused tokens to the model's vocabulary (the bench
feeds token ids, never text).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8
FILE_TYPE = {"f16": 1, "q8_0": 7}  # llama_ftype: MOSTLY_F16, MOSTLY_Q8_0
ALIGN = 32
_UINT32, _INT32, _FLOAT32, _STRING, _ARRAY = 4, 5, 6, 8, 9
QK8_0 = 32


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v) -> tuple[int, bytes]:
    if isinstance(v, str):
        return _STRING, _str(v)
    if isinstance(v, float):
        return _FLOAT32, struct.pack("<f", v)
    if isinstance(v, int):
        return _UINT32, struct.pack("<I", v)
    if isinstance(v, tuple) and v[0] == "int32":  # ("int32", [..])
        return _ARRAY, struct.pack("<IQ", _INT32, len(v[1])) + struct.pack(f"<{len(v[1])}i", *v[1])
    if isinstance(v, list):  # list of strings
        return _ARRAY, struct.pack("<IQ", _STRING, len(v)) + b"".join(_str(s) for s in v)
    raise TypeError(type(v))


def quantize_q8_0(x: np.ndarray) -> bytes:
    """Rows of `x` (last dim a multiple of 32) as q8_0 blocks: f16 scale + 32 int8 per block."""
    blocks = x.astype(np.float32).reshape(-1, QK8_0)
    d = np.abs(blocks).max(axis=1) / 127
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.round(blocks * inv[:, None]).clip(-127, 127).astype(np.int8)
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("qs", "i1", (QK8_0,))])
    out["d"], out["qs"] = d.astype(np.float16), q
    return out.tobytes()


def gpt2_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array in numpy shape [rows, cols]) in llama.cpp's GPT-2 naming."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["transformer.wte.weight"]), ("position_embd.weight", sd["transformer.wpe.weight"])]
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(model.config.n_layer):
        for hf, gg in names.items():
            w, b = sd[f"transformer.h.{i}.{hf}.weight"], sd[f"transformer.h.{i}.{hf}.bias"]
            out.append((f"blk.{i}.{gg}.weight", w.t().contiguous() if w.dim() == 2 else w))  # Conv1D [in, out] -> [out, in]
            out.append((f"blk.{i}.{gg}.bias", b))
    out += [("output_norm.weight", sd["transformer.ln_f.weight"]), ("output_norm.bias", sd["transformer.ln_f.bias"]),
            ("output.weight", sd["transformer.wte.weight"])]  # the tied head, written out as convert_hf_to_gguf does
    return [(n, t.numpy()) for n, t in out]


def _encode(name: str, a: np.ndarray, kind: str) -> tuple[int, bytes]:
    if a.ndim == 1:
        return GGML_F32, a.astype(np.float32).tobytes()
    if kind == "q8_0" and name != "position_embd.weight" and a.shape[-1] % QK8_0 == 0:
        return GGML_Q8_0, quantize_q8_0(a)
    return GGML_F16, a.astype(np.float16).tobytes()


def tokenizer_vocab(tokenizer) -> tuple[list[str], list[str]]:
    """A HF fast byte-level BPE tokenizer's tokens (by id) and merges ("a b"), as GGUF lists them."""
    import json

    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_gpt2(model, path: Path, kind: str, tokens: list[str] | None = None, merges: list[str] | None = None) -> Path:
    """Write `model` to `path` as GGUF (`kind` f16 or q8_0); returns `path`."""
    cfg = model.config
    vocab = int(cfg.vocab_size)
    tokens = list(tokens or [])[:vocab]
    types = [1] * len(tokens)  # NORMAL
    tokens += [f"<unused{i}>" for i in range(len(tokens), vocab)]
    types += [5] * (vocab - len(types))  # UNUSED
    eos = int(cfg.eos_token_id if cfg.eos_token_id is not None else vocab - 1)
    meta: dict = {
        "general.architecture": "gpt2", "general.name": "switchboard-bench-gpt2", "general.alignment": ALIGN,
        "general.file_type": FILE_TYPE[kind], "gpt2.context_length": int(cfg.n_positions),
        "gpt2.embedding_length": int(cfg.n_embd), "gpt2.feed_forward_length": int(cfg.n_inner or 4 * cfg.n_embd),
        "gpt2.block_count": int(cfg.n_layer), "gpt2.attention.head_count": int(cfg.n_head),
        "gpt2.attention.layer_norm_epsilon": float(cfg.layer_norm_epsilon),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": ("int32", types), "tokenizer.ggml.merges": list(merges or []),
        "tokenizer.ggml.bos_token_id": eos, "tokenizer.ggml.eos_token_id": eos,
    }
    with torch.no_grad():
        tensors = [(n, *_encode(n, a, kind), a.shape) for n, a in gpt2_tensors(model)]
    header = struct.pack("<IIQQ", 0x46554747, 3, len(tensors), len(meta))
    for k, v in meta.items():
        t, payload = _value(v)
        header += _str(k) + struct.pack("<I", t) + payload
    offset, infos, blobs = 0, b"", []
    for name, gtype, data, shape in tensors:
        ne = tuple(reversed(shape))  # ggml's ne[0] is the contiguous (last numpy) dimension
        infos += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        infos += struct.pack("<IQ", gtype, offset)
        pad = (-len(data)) % ALIGN
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = header + infos
    head += b"\0" * ((-len(head)) % ALIGN)
    path.write_bytes(head + b"".join(blobs))
    return path
