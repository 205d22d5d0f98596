"""An adapter's validated weights as the engine holds them, and what adapters are validated against.

Reading them from the store (and every check on the files) is `server.store.folder`'s job; the
engine only ever sees these dataclasses.
"""

from __future__ import annotations

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


@dataclass
class AdapterWeights:
    name: str
    path: Path
    rank: int
    alpha: float
    scale: float
    target_modules: list[str]
    # module path -> (A [in, r], B·scale [r, out]) on CPU, ready to copy into a slot
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    meta: dict = field(default_factory=dict)
    centroids: torch.Tensor | None = None  # [m, d]
    centroid_embedder: str | None = None
    _staged: dict = field(default_factory=dict, repr=False, compare=False)

    def staged(self, dtype: torch.dtype, pin: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`tensors` cast to the serving dtype, in page-locked memory when `pin` (for CUDA): what a
        slot install copies from. Made once per adapter and dtype and kept, so an install is only
        the copy: from pinned memory with `non_blocking`, queued on the stream without waiting for
        the GPU (a pageable copy blocks the engine thread mid-step until the GPU catches up)."""
        key = (dtype, pin)
        hit = self._staged.get(key)
        if hit is None:
            def stage(t: torch.Tensor) -> torch.Tensor:
                t = t.to(dtype).contiguous()
                return t.pin_memory() if pin else t

            hit = self._staged[key] = {path: (stage(a), stage(b)) for path, (a, b) in self.tensors.items()}
        return hit

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values())
