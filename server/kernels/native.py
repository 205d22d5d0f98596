"""Build and load the native int8 kernels (`int8_gemv.cpp`) once per machine, through ctypes.

Why native: at 1–8 rows a decode step streams every weight once, so its products should run at
memory speed on one byte a weight. On CPUs without AVX-512 neither of torch's int8 paths does:
`_weight_int8pack_mm` has no AVX2 fast path, and fbgemm's dynamic int8 linear at one row runs at
about half the bandwidth (docs/performance.md, "The native int8 kernels"). The kernels are one
file of C++ with AVX2 intrinsics (a CPU without AVX2 fails the build and keeps torch's kernels), so they are compiled here rather than
shipped as a wheel: `-O3 -march=native` for the CPU they run on, with OpenMP.

Where the compiled library lives: `$SWITCHBOARD_KERNEL_DIR`, else `$XDG_CACHE_HOME/switchboard/
kernels`, else `~/.cache/switchboard/kernels`, one file per (source, compiler, flags, CPU)
hash, written to a temporary name and renamed into place, so concurrent builds never load a
half-written file. A build takes ~2 s with g++.

If anything fails — no compiler, a compile error, an unwritable cache, a library whose results
disagree with a float reference — `load()` logs why once and returns None, and `--quant int8`
falls back to torch's kernel, `--quant w8a8` to fbgemm. `SWITCHBOARD_NATIVE_KERNELS=0` turns it off (A/B runs, debugging).

OpenMP: the library links `libgomp.so.1`, the soname torch's CPU wheel loads (torch is imported
first), so the dynamic loader hands it torch's own runtime: one thread pool, not two spinning
against each other on the same cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_gemv.cpp")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
_VOIDP, _I64 = ctypes.c_void_p, ctypes.c_int64


@dataclass(frozen=True)
class NativeInt8:
    """The loaded library's entry points (see int8_gemv.cpp for their contracts): weight-only
    (`pack`/`linear`, fp32 activations), w8a8 (`pack_w8a8`/`linear_w8a8`, activations quantised
    per row to 7 bits inside the call), and the LoRA layer's two fp32 products beside them
    (`lora_down`, `lora_up_`)."""

    lib: ctypes.CDLL
    path: Path

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """q [N, K] int8 row-major (K % 8 == 0) -> the kernel's packed layout, same shape and dtype."""
        return self._pack(self.lib.sb_int8_pack, q, torch.int8)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] (any float dtype) -> [M, N] in x's dtype: x (packed · scales)ᵀ + bias, in fp32."""
        return self._call(self.lib.sb_int8_linear, x, packed, scales, bias)

    def pack_w8a8(self, q: torch.Tensor) -> torch.Tensor:
        """q [N, K] int8 row-major (K % 32 == 0) -> the w8a8 layout: [N, K] uint8 (q + 128)."""
        return self._pack(self.lib.sb_w8a8_pack, q, torch.uint8)

    def linear_w8a8(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] (any float dtype) -> [M, N] in x's dtype, each row quantised on its own scale."""
        return self._call(self.lib.sb_w8a8_linear, x, packed, scales, bias)

    def lora_down(self, x: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        """h [M, R] = x [M, K] · a_tᵀ: fp32, x with unit column stride, a_t [R, K] contiguous, K % 8 == 0."""
        m, (r, k) = x.shape[0], a_t.shape
        x = x if x.stride(1) == 1 else x.contiguous()
        h = torch.empty(m, r, dtype=torch.float32, device=x.device)
        self.lib.sb_f32_linear(x.data_ptr(), x.stride(0), a_t.data_ptr(), h.data_ptr(), m, r, k,
                               torch.get_num_threads())
        return h

    def lora_up_(self, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """y [M, N] += h [M, R] · b [R, N], in place: fp32, h and b contiguous, y with unit column stride."""
        m, (r, n) = h.shape[0], b.shape
        self.lib.sb_f32_addmm(h.data_ptr(), b.data_ptr(), y.data_ptr(), y.stride(0), m, r, n,
                              torch.get_num_threads())
        return y

    @staticmethod
    def _pack(fn: Any, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = q.contiguous()
        packed = torch.empty(q.shape, dtype=dtype, device=q.device)
        fn(q.data_ptr(), packed.data_ptr(), q.shape[0], q.shape[1])
        return packed

    @staticmethod
    def _call(fn: Any, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """One int8 product: the kernels read fp32 rows with unit column stride and write fp32, so
        other dtypes and layouts are converted here, once, and the result goes back to x's dtype."""
        xf = x if x.dtype == torch.float32 and x.stride(1) == 1 else x.float().contiguous()
        n, k = packed.shape
        m = xf.shape[0]
        y = torch.empty(m, n, dtype=torch.float32, device=xf.device)
        fn(xf.data_ptr(), xf.stride(0), packed.data_ptr(), scales.data_ptr(),
           None if bias is None else bias.data_ptr(), y.data_ptr(), n, m, n, k, torch.get_num_threads())
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def unpack(packed: torch.Tensor) -> torch.Tensor:
        """The packed layout back to row-major [N, K] (the dense fallback's dequantisation)."""
        n, k = packed.shape
        n8 = n - n % 8
        head = packed[:n8].reshape(n8 // 8, k // 8, 8, 8).permute(0, 2, 1, 3).reshape(n8, k)
        return torch.cat([head, packed[n8:]]) if n8 < n else head.contiguous()


def _cache_dir() -> Path:
    if os.environ.get("SWITCHBOARD_KERNEL_DIR"):
        return Path(os.environ["SWITCHBOARD_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "switchboard" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *FLAGS, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    target = out_dir / f"int8_gemv-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".int8_gemv-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _agrees(kernel: NativeInt8) -> bool:
    """The library's products against a float reference on awkward shapes (N % 8 != 0, 1–9 rows):
    weight-only to fp32 rounding, w8a8 to its 7-bit activations (≤ 3 %)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (21, 64), generator=gen, dtype=torch.int8)
    s, b = torch.rand(21, generator=gen) / 100, torch.randn(21, generator=gen)
    packed, packed8 = kernel.pack(q), kernel.pack_w8a8(q)
    if not torch.equal(kernel.unpack(packed), q):
        return False
    for m in (1, 2, 3, 9):
        x = torch.randn(m, 64, generator=gen)
        ref = x.double() @ (q.double() * s.double()[:, None]).t() + b.double()
        if not torch.allclose(kernel.linear(x, packed, s, b).double(), ref, rtol=1e-4, atol=1e-4):
            return False
        got8 = kernel.linear_w8a8(x, packed8, s, b).double()
        if float((got8 - ref).norm() / ref.norm()) > 0.03:
            return False
        a_t, up = torch.randn(11, 64, generator=gen), torch.randn(11, 70, generator=gen)
        h = kernel.lora_down(x, a_t)
        y = kernel.lora_up_(torch.ones(m, 70), h, up)
        if not (torch.allclose(h.double(), x.double() @ a_t.double().t(), rtol=1e-4, atol=1e-4)
                and torch.allclose(y.double(), 1 + h.double() @ up.double(), rtol=1e-4, atol=1e-4)):
            return False
    return True


@functools.cache
def load() -> NativeInt8 | None:
    """The native int8 kernel for this machine, built on first call; None (logged once) where it
    cannot be built, loaded or trusted. CPU only."""
    if os.environ.get("SWITCHBOARD_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("native int8 kernel: no C++ compiler (g++ or $CXX) found; using torch's int8 kernel")
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
        lib.sb_int8_pack.argtypes = [_VOIDP, _VOIDP, _I64, _I64]
        lib.sb_int8_pack.restype = None
        lib.sb_int8_linear.argtypes = [_VOIDP, _I64, _VOIDP, _VOIDP, _VOIDP, _VOIDP, _I64, _I64, _I64, _I64,
                                       ctypes.c_int]
        lib.sb_int8_linear.restype = None
        lib.sb_w8a8_pack.argtypes = [_VOIDP, _VOIDP, _I64, _I64]
        lib.sb_w8a8_pack.restype = None
        lib.sb_w8a8_linear.argtypes = lib.sb_int8_linear.argtypes
        lib.sb_w8a8_linear.restype = None
        lib.sb_f32_linear.argtypes = [_VOIDP, _I64, _VOIDP, _VOIDP, _I64, _I64, _I64, ctypes.c_int]
        lib.sb_f32_linear.restype = None
        lib.sb_f32_addmm.argtypes = [_VOIDP, _VOIDP, _VOIDP, _I64, _I64, _I64, _I64, ctypes.c_int]
        lib.sb_f32_addmm.restype = None
        kernel = NativeInt8(lib, path)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        log.warning("native int8 kernel unavailable (%s); using torch's int8 kernel", exc)
        return None
    if not _agrees(kernel):
        log.warning("native int8 kernel %s disagrees with a float reference; using torch's int8 kernel", path)
        return None
    log.info("native int8 kernel loaded from %s", path)
    return kernel
