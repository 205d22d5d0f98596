"""Counting the tensor reads that are host syncs on a GPU (`item`, `tolist`, `__int__`, `__bool__`,
`.cpu()`, ...), by call site, with a `TorchFunctionMode`: on CPU nothing syncs, but the same
calls on CUDA tensors each wait for the GPU, so a CPU test can hold a step to a sync budget."""

from __future__ import annotations

import traceback
from collections import Counter

from torch.overrides import TorchFunctionMode

SYNCS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu", "numpy")


class SyncCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            frame = traceback.extract_stack(limit=2)[0]
            self.sites[f"{name} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.sites.values())
