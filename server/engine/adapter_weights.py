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

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values())
