"""Reading and validating PEFT LoRA folders from the adapter store.

Everything is checked before anything is installed (files, JSON, target modules, shapes, rank,
base fingerprint), so a refused adapter leaves the registry exactly as it was. Weights are read
from safetensors files only (`tensor_file`): a pickle `adapter_model.bin` is refused without
being opened.

Two depths: `index_adapter` checks everything but the factors' values (config, metadata, the
safetensors header's names, shapes and dtypes; centroids) and gives weights whose `loader` reads
and checks the values later, on first use; `read_adapter` does both at once (the admin API), in
one read: the loader checks the header's names, dtypes and shapes with the same messages.
Thousands of adapters are indexed at start in the time it takes to read their headers.
"""

from __future__ import annotations

import json
import math
import re
import threading
from functools import partial
from pathlib import Path

import numpy as np
import torch

from router_core import store_rules
from router_core.store_rules import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CENTROID_FILE, META_FILE, StoreRuleError
from server.engine.adapter_weights import AdapterWeights, BaseSpec, Factors
from server.engine.errors import InvalidAdapter, InvalidRequest, out_of_memory
from server.store.tensor_file import DTYPES, TensorFileError, TensorInfo, read_header, read_into

MAX_ADAPTER_BYTES = 512 * 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024  # adapter_config.json and switchboard.json are a few hundred bytes
# |lora_alpha / r| (or / sqrt(r) with rsLoRA): PEFT's usual values are 0.5-4; beyond this a gate of
# 1 already multiplies the adapter's delta past what fp16 activations hold.
MAX_LORA_SCALE = 256.0
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")  # fullmatch


def check_name(name: str, param: str = "name") -> str:
    """The store's name rule (`router_core.store_rules`) as a 400 naming the offending field."""
    try:
        return store_rules.check_name(name)
    except StoreRuleError as e:
        raise InvalidRequest(str(e), param=param) from None


def resolve_in_store(store: Path, relative: str, param: str = "path", what: str = "adapter") -> Path:
    """Resolve `relative` inside the store; absolute paths, `..` and symlinks out of it are refused,
    and so is anything the file system cannot resolve (a symlink loop, a name over 255 bytes).
    `what` names the thing in the messages (an adapter or a router folder)."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise InvalidRequest(f"{what} path must be a non-empty string", param=param)
    shown = relative if len(relative) <= 80 else relative[:77] + "..."
    try:
        relative.encode("utf-8")
        root = store.resolve()
        candidate = Path(relative)
        if candidate.is_absolute():
            try:
                candidate = candidate.resolve().relative_to(root)
            except ValueError:
                raise InvalidRequest(f"{what} path {shown!r} is outside the adapter store", param=param) from None
        resolved = (root / candidate).resolve()
        if resolved != root and root not in resolved.parents:
            raise InvalidRequest(f"{what} path {shown!r} is outside the adapter store", param=param)
        if not resolved.is_dir():
            raise InvalidRequest(f"{what} path {shown!r} is not a folder in the adapter store", param=param)
    except (OSError, RuntimeError, UnicodeError) as e:  # RuntimeError: pathlib's "Symlink loop"
        raise InvalidRequest(f"{what} path {shown!r} cannot be resolved: {type(e).__name__}", param=param) from None
    return resolved


def file_in_store(path: Path, store: Path) -> Path:
    """`path` (a file in a folder already resolved inside the store) if it is no symlink out of
    the store; a folder's files are opened only through this."""
    try:
        root, target = store.resolve(), path.resolve()
    except (OSError, RuntimeError) as e:
        raise InvalidAdapter(f"{path.name} cannot be resolved: {type(e).__name__}") from None
    if root not in target.parents:
        raise InvalidAdapter(f"{path.parent.name}/{path.name} links outside the adapter store")
    return target


def _read_json(path: Path, what: str) -> dict:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InvalidAdapter(f"{what} {path.name} is larger than {MAX_JSON_BYTES >> 10} KiB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(f"{what} {path.name} does not parse: {e}") from e
    except RecursionError:  # nested thousands deep
        raise InvalidAdapter(f"{what} {path.name} is nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{what} {path.name} must hold a JSON object")
    return data


def _check_config(cfg: dict, spec: BaseSpec) -> tuple[int, float, float]:
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidAdapter(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if rank > spec.max_rank:
        raise InvalidAdapter(f"adapter rank {rank} exceeds the server's max_lora_rank {spec.max_rank}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidAdapter(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    for unsupported in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(unsupported):
            raise InvalidAdapter(f"adapter_config.json: {unsupported} is not supported by the serving engine")
    if cfg.get("use_dora"):
        raise InvalidAdapter("DoRA adapters (use_dora) are not supported by the serving engine")
    if cfg.get("bias", "none") != "none":
        raise InvalidAdapter("adapters with trained biases (bias != 'none') are not supported")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    if not abs(scale) <= MAX_LORA_SCALE:
        raise InvalidAdapter(f"adapter_config.json: lora_alpha {alpha!r} gives a LoRA scale of {scale:.3g}; "
                             f"the server accepts |scale| <= {MAX_LORA_SCALE:g}")
    return rank, float(alpha), float(scale)


_FLOATS = frozenset(DTYPES[code] for code in ("F16", "BF16", "F32", "F64"))  # the factor dtypes accepted


def _pair_keys(keys: list[str], spec: BaseSpec, path: Path) -> dict[str, dict[str, str]]:
    """module -> {"A": key, "B": key}, every key a LoRA factor of a module the base model has."""
    pairs: dict[str, dict[str, str]] = {}
    for key in keys:
        m = _KEY.fullmatch(key)
        if m is None:
            raise InvalidAdapter(f"unexpected tensor {key!r}: only LoRA A/B weights are supported")
        pairs.setdefault(m["module"], {})[m["ab"]] = key
    if not pairs:
        raise InvalidAdapter(f"{path.name} holds no LoRA weights")
    for module, ab in pairs.items():
        if module not in spec.module_shapes:
            raise InvalidAdapter(f"target module {module!r} does not exist in the base model (or is not a Conv1D)")
        if set(ab) != {"A", "B"}:
            raise InvalidAdapter(f"module {module!r} is missing its lora_{'B' if 'A' in ab else 'A'} weight")
    return pairs


def _check_shapes(module: str, a: tuple[int, ...], b: tuple[int, ...], rank: int, spec: BaseSpec) -> None:
    d_in, d_out = spec.module_shapes[module]
    if tuple(a) != (rank, d_in) or tuple(b) != (d_out, rank):  # PEFT stores A [r, in] and B [out, r]
        raise InvalidAdapter(
            f"module {module!r}: lora_A {tuple(a)} / lora_B {tuple(b)} do not match rank {rank} "
            f"and the base shape (in={d_in}, out={d_out})"
        )


def _checked_pairs(infos: dict[str, TensorInfo], rank: int, spec: BaseSpec, path: Path) -> dict[str, dict[str, str]]:
    """`_pair_keys` of a file's header, every factor floating point and of its module's shape:
    the checks an index and a read share, with the same messages."""
    pairs = _pair_keys(list(infos), spec, path)
    for module, ab in sorted(pairs.items()):
        a, b = infos[ab["A"]], infos[ab["B"]]
        if a.dtype not in _FLOATS or b.dtype not in _FLOATS:
            raise InvalidAdapter(f"module {module!r}: LoRA weights must be floating point")
        _check_shapes(module, a.shape, b.shape, rank, spec)
    return pairs


def _index_tensors(path: Path, rank: int, spec: BaseSpec) -> tuple[list[str], int]:
    """Check the safetensors header (names, shapes, dtypes) without reading the values; returns
    the target module paths and the factors' size in the serving dtype."""
    if path.stat().st_size > MAX_ADAPTER_BYTES:
        raise InvalidAdapter(f"{path.name} is larger than {MAX_ADAPTER_BYTES >> 20} MiB")
    try:
        infos = read_header(path, MAX_ADAPTER_BYTES)
    except TensorFileError as e:
        raise InvalidAdapter(f"{path.name} is not a readable safetensors file: {e}") from e
    pairs = _checked_pairs(infos, rank, spec, path)
    numel = sum(math.prod(infos[key].shape) for ab in pairs.values() for key in ab.values())
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    return sorted(pairs), numel * itemsize


SCRATCH_BYTES = 16 << 20
CHUNK_BYTES = 768 << 10  # per chunk of output; whole stacks (1-2.4 MB) came back as fresh pages per register
_SCRATCH = threading.local()


def _scratch(nbytes: int) -> torch.Tensor:
    """`nbytes` of this thread's read buffer, kept from one read to the next (up to SCRATCH_BYTES,
    so a reading thread holds at most 16 MiB; 6.5 MB for GPT-2 124M at rank 16): a buffer of MBs
    malloc'd and freed per read came back as fresh pages each time (~1,500 page faults, ~4 ms a
    register on this VM; docs/performance.md). Nothing returned is a view of it."""
    if nbytes > SCRATCH_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _SCRATCH.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes]


def _read_tensors(path: Path, rank: int, scale: float, spec: BaseSpec) -> Factors:
    """Read and check the factors' values: finite, and finite in the serving dtype once scaled.
    They are kept in the serving dtype (half the host memory of fp32 when serving bf16).

    The file's factors of one side, dtype and shape (GPT-2's 12 c_attn lora_A, ...) are read
    straight into one stack of this thread's read buffer: one norm call per stack, then a few
    factors at a time (CHUNK_BYTES of output) a batched transpose into the serving layout, the
    scale and the rounding; each module keeps views of those outputs. Per-factor ops were most
    of a registration at GPT-2's sizes, and outputs of MBs came back as fresh pages from malloc
    on every register (docs/performance.md)."""
    if path.stat().st_size > MAX_ADAPTER_BYTES:
        raise InvalidAdapter(f"{path.name} is larger than {MAX_ADAPTER_BYTES >> 20} MiB")
    stacks: list[tuple[str, list[str], torch.dtype, tuple[int, ...], int]] = []  # side, modules, dtype, shape, at

    def place(infos: dict[str, TensorInfo]) -> tuple[torch.Tensor, dict[str, int]]:
        pairs = _checked_pairs(infos, rank, spec, path)
        kinds: dict[tuple[str, torch.dtype, tuple[int, ...]], list[str]] = {}
        for module, ab in sorted(pairs.items()):
            a, b = infos[ab["A"]], infos[ab["B"]]
            kinds.setdefault(("A", a.dtype, a.shape), []).append(module)
            kinds.setdefault(("B", b.dtype, b.shape), []).append(module)
        offsets, at = {}, 0
        for (side, dtype, shape), modules in kinds.items():
            at += -at % 64  # each stack aligned (a 2-byte stack of odd size would misalign the next)
            stacks.append((side, modules, dtype, shape, at))
            for m in modules:
                offsets[pairs[m][side]] = at
                at += math.prod(shape) * dtype.itemsize
        held.append(_scratch(at))
        return held[0], offsets

    held: list[torch.Tensor] = []
    try:
        read_into(path, MAX_ADAPTER_BYTES, place)
    except TensorFileError as e:
        raise InvalidAdapter(f"{path.name} is not a readable safetensors file: {e}") from e
    buf = held[0]
    # one fp32 norm per factor, each side and shape at once; a module the bounds below do not clear
    # outright (NaN, inf, or near a bound) takes the exact checks, with their messages
    files: dict[str, list[tuple[list[str], torch.Tensor]]] = {}  # side -> (its modules, their stack as in the file)
    norms: dict[tuple[str, str], float] = {}  # (module, side) -> ‖factor‖
    for side, modules, dtype, shape, at in stacks:
        stack = buf[at:at + len(modules) * math.prod(shape) * dtype.itemsize].view(dtype).view(len(modules), *shape)
        files.setdefault(side, []).append((modules, stack))
        norms.update(zip(((m, side) for m in modules),
                         _norms(stack).tolist(), strict=True))
    largest, budget, s = torch.finfo(spec.dtype).max, factor_budget(spec.dtype), abs(scale)
    for module in sorted({m for m, _ in norms}):
        a, b = norms[module, "A"], norms[module, "B"]
        # max |a| <= ‖A‖ and max |s·b| <= |s|·‖B‖, so these clear every exact check below
        if not (a <= budget and a * b * s <= budget and b * s <= largest):  # NaN/inf fail them too
            a32, b32 = (next(st[ms.index(module)] for ms, st in files[side] if module in ms).float() for side in "AB")
            _check_values(module, a32, b32, scale, spec.dtype)
    # the serving layout, a chunk of factors at a time: A [in, r] <- [r, in], B·scale [r, out] <-
    # [out, r], in fp32 then rounded once to the serving dtype
    out: dict[str, dict[str, torch.Tensor]] = {}
    for side, parts in files.items():
        for modules, stack in parts:
            k = max(1, CHUNK_BYTES // (4 * stack[0].numel()))
            for lo in range(0, len(modules), k):
                t = _transposed(stack[lo:lo + k].float())
                if side == "B":
                    t.mul_(scale)
                if spec.dtype != torch.float32:
                    t = t.to(spec.dtype)
                for m, f in zip(modules[lo:lo + k], t.unbind(0), strict=True):
                    out.setdefault(m, {})[side] = f
    return {m: (out[m]["A"], out[m]["B"]) for m in sorted(out)}


def _norms(stack: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of each matrix of `stack` [k, m, n], summed in fp32 (fp64 files in fp64)."""
    wide = torch.float64 if stack.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(stack, dim=(1, 2), dtype=wide)


def _check_values(module: str, a32: torch.Tensor, b32: torch.Tensor, scale: float, dtype: torch.dtype) -> None:
    """The exact checks of one module's factors (fp32): finite; finite in `dtype` once scaled;
    within the range budget (`_check_range`)."""
    largest = torch.finfo(dtype).max
    if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
        raise InvalidAdapter(f"module {module!r} holds NaN or infinite weights")
    b_scaled = b32 * scale
    if not (a32.abs().max() <= largest and b_scaled.abs().max() <= largest):
        raise InvalidAdapter(f"module {module!r}: weights times the LoRA scale {scale:.3g} overflow {dtype}")
    _check_range(module, a32, b_scaled, dtype)


def _transposed(stack: torch.Tensor) -> torch.Tensor:
    """Each matrix of `stack` [k, m, n] transposed, contiguous [k, n, m] (an exact copy). The
    transpose is a channel shuffle: each [m, n] matrix seen as one channels-last pixel of m·n
    channels in m groups is shuffled into [n, m], which torch does with FBGEMM's SIMD transpose
    (`ATen/native/cpu/ChannelShuffleKernel.cpp`); torch's copy of a transposed [16, 768] fp32
    factor took 3-4x as long, numpy's 2x (docs/performance.md). Where FBGEMM refuses the CPU
    (x86 without AVX2), numpy's copy."""
    k, m, n = stack.shape
    src = stack.contiguous()
    try:
        out = torch.native_channel_shuffle(src.view(k, 1, 1, m * n).permute(0, 3, 1, 2), m).view(k, n, m)
    except RuntimeError:  # "Your CPU does not support FBGEMM"
        out = torch.empty(k, n, m, dtype=src.dtype)
        np.copyto(out.numpy(), src.numpy().transpose(0, 2, 1))
    return out.clone() if out.data_ptr() == src.data_ptr() else out  # never an alias: scaled in place


def _load_factors(name: str, path: Path, stamp: tuple[int, int], rank: int, scale: float, spec: BaseSpec) -> Factors:
    """The loader of indexed weights: the file must be the one that was indexed (same size and
    modification time); a changed file is refused, never served as the registered version."""
    try:
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) != stamp:
            raise InvalidAdapter(f"adapter {name!r}: {path.name} changed on disk since it was registered; "
                                 "register it again (POST /admin/reload)")
        return _read_tensors(path, rank, scale, spec)
    except (OSError, RuntimeError, RecursionError) as e:
        if out_of_memory(e):  # the host's memory, not the adapter: the host tier makes room and retries
            raise MemoryError(f"adapter {name!r}: {str(e)[:200]}") from None
        raise InvalidAdapter(f"adapter {name!r}: could not be read: {type(e).__name__}: {str(e)[:200]}") from None


def factor_budget(dtype: torch.dtype) -> float:
    """The largest ‖A‖_F and ‖A‖_F·‖s·B‖_F an adapter may have when served in `dtype`: √max of the
    dtype. By Cauchy–Schwarz every partial sum of `x A` and of `(g x A)(s B)` then stays below the
    dtype's largest value for any input row and gate with g·‖x‖₂ ≤ √max (256 in fp16, 1.8e19 in
    fp32 and bf16): the range is split evenly between activations and weights. PEFT adapters sit
    far inside it (‖A‖_F ≈ 0.6·√r at PEFT's init, B trained from zero); an adapter outside it
    overflows for ordinary activations. Past the bound the engine still confines a non-finite
    delta to the rows that weight the adapter (`lora_layer.gated`)."""
    return math.sqrt(torch.finfo(dtype).max)


def _check_range(module: str, a: torch.Tensor, b_scaled: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse factors whose products overflow `dtype` for ordinary inputs (see `factor_budget`):
    finite weights whose `x A` is inf would make every row that uses the adapter fail."""
    budget = factor_budget(dtype)
    a_norm = torch.linalg.vector_norm(a.double()).item()
    ab_norm = a_norm * torch.linalg.vector_norm(b_scaled.double()).item()
    if not (a_norm <= budget and ab_norm <= budget):
        raise InvalidAdapter(
            f"module {module!r}: ‖lora_A‖ = {a_norm:.3g} and ‖lora_A‖·‖scale·lora_B‖ = {ab_norm:.3g} overflow "
            f"{str(dtype).removeprefix('torch.')} for ordinary activations; the server accepts at most {budget:.3g} for each")


def read_centroids(path: Path) -> tuple[torch.Tensor | None, str | None, str | None]:
    """(centroids, embedder id, the examples' form group) of a centroid file, Nones without one."""
    if not path.exists():
        return None, None, None
    from router_core.artifacts import ArtifactError, load_centroid_file

    try:
        return load_centroid_file(path)
    except ArtifactError as e:
        raise InvalidAdapter(f"centroid.safetensors: {e}") from e


def read_adapter(name: str, folder: Path, spec: BaseSpec, store: Path | None = None) -> AdapterWeights:
    """Validate and read one adapter folder; raises InvalidAdapter with the first problem found.
    With `store`, every file must resolve inside it (a file symlinked out of the store is refused)."""
    return _guarded(name, folder, spec, store, read=True)


def index_adapter(name: str, folder: Path, spec: BaseSpec, store: Path | None = None) -> AdapterWeights:
    """Validate one adapter folder but the factors' values (read on first use by `loader`)."""
    return _guarded(name, folder, spec, store, read=False)


def _guarded(name: str, folder: Path, spec: BaseSpec, store: Path | None, read: bool) -> AdapterWeights:
    try:
        return _index_adapter(name, folder, spec, store, read)
    except (OSError, RuntimeError, RecursionError, MemoryError) as e:  # whatever the file system throws
        raise InvalidAdapter(f"{folder.name}: could not be read: {type(e).__name__}: {str(e)[:200]}") from None


def _index_adapter(name: str, folder: Path, spec: BaseSpec, store: Path | None, read: bool) -> AdapterWeights:
    def inside(path: Path) -> Path:
        return path if store is None or not path.exists() else file_in_store(path, store)

    config_path = inside(folder / ADAPTER_CONFIG)
    weights_path = inside(folder / ADAPTER_WEIGHTS)
    if not config_path.is_file():
        raise InvalidAdapter(f"{folder.name}: adapter_config.json is missing")
    if not weights_path.is_file():
        if (folder / "adapter_model.bin").exists():
            raise InvalidAdapter(
                f"{folder.name}: only a pickle adapter_model.bin is present; pickles are never loaded, "
                "convert it to adapter_model.safetensors"
            )
        raise InvalidAdapter(f"{folder.name}: adapter_model.safetensors is missing")
    rank, alpha, scale = _check_config(_read_json(config_path, "adapter config"), spec)
    meta: dict = {}
    if (folder / META_FILE).is_file():
        meta = _read_json(inside(folder / META_FILE), "metadata")
        fp = meta.get("base_fingerprint")
        if fp and fp != spec.fingerprint:
            raise InvalidAdapter(
                f"{folder.name} was trained on a different base model (fingerprint {str(fp)[:12]}…, "
                f"resident {spec.fingerprint[:12]}…)"
            )
    st = weights_path.stat()
    loader = partial(_load_factors, name, weights_path, (st.st_size, st.st_mtime_ns), rank, scale, spec)
    tensors = None
    if read:  # the read checks all the header index does (names, dtypes, shapes), with its messages
        tensors = loader()
        modules = sorted(tensors)
        nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in tensors.values())
    else:
        modules, nbytes = _index_tensors(weights_path, rank, spec)
    centroids, embedder, form = read_centroids(inside(folder / CENTROID_FILE))
    return AdapterWeights(
        name=name, path=folder, rank=rank, alpha=alpha, scale=scale,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        tensors=tensors, meta=meta, centroids=centroids, centroid_embedder=embedder, example_form=form,
        loader=loader, factor_bytes=nbytes,
    )
