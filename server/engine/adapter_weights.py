"""An adapter's validated weights as the engine holds them, and what adapters are validated against.

Reading them from the store (and every check on the files) is `server.store.folder`'s job; the
engine only ever sees these dataclasses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class BaseSpec:
    """What an adapter is validated against: the resident model's LoRA-targetable modules."""

    module_shapes: dict[str, tuple[int, int]]  # module path -> (in, out)
    fingerprint: str
    max_rank: int
    dtype: torch.dtype = torch.float32  # the serving dtype: scaled weights must stay finite in it


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [in, r], B·scale [r, out])


@dataclass
class AdapterWeights:
    """An adapter's validated description, and its factors while they are in host memory.

    `tensors` is None while the factors are on disk only (indexed at start, or evicted by the
    host tier, `server.engine.host_tier`); `loader` reads and validates them again (the store
    supplies it, so the engine never touches files). Weights built without a loader keep their
    tensors for good.
    """

    name: str
    path: Path
    rank: int
    alpha: float
    scale: float
    target_modules: list[str]
    # module path -> (A [in, r], B·scale [r, out]) on CPU in the serving dtype, ready for a slot
    tensors: Factors | None
    meta: dict = field(default_factory=dict)
    centroids: torch.Tensor | None = None  # [m, d]
    centroid_embedder: str | None = None
    example_form: str | None = None  # the form most of its examples have (router_core.form.adapter_form), if read
    loader: Callable[[], Factors] | None = field(default=None, repr=False)
    factor_bytes: int = 0  # size of `tensors` when loaded (known from the file's header before that)
    _staged: dict = field(default_factory=dict, repr=False, compare=False)

    def staged(self, dtype: torch.dtype, pin: bool, factors: Factors | None = None) -> Factors:
        """`tensors` (or `factors`, the host tier's copy) cast to the serving dtype, in page-locked
        memory when `pin` (for CUDA): what a slot install copies from. Made once per adapter and
        dtype and kept (until the host tier evicts the factors), so an install is only
        the copy: from pinned memory with `non_blocking`, queued on the stream without waiting for
        the GPU (a pageable copy blocks the engine thread mid-step until the GPU catches up)."""
        factors = self.tensors if factors is None else factors
        assert factors is not None, f"adapter {self.name!r}: factors not loaded"
        key = (dtype, pin)
        hit = self._staged.get(key)
        if hit is None:
            def stage(t: torch.Tensor) -> torch.Tensor:
                t = t.to(dtype).contiguous()
                return t.pin_memory() if pin else t

            hit = self._staged[key] = {path: (stage(a), stage(b)) for path, (a, b) in factors.items()}
        return hit

    def drop_factors(self) -> None:
        """Let the factors (and their staged copies) go; `loader` brings them back."""
        self.tensors = None
        self._staged = {}

    @property
    def nbytes(self) -> int:
        if self.tensors is None:
            return self.factor_bytes
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values())
