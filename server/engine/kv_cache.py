"""A pre-allocated key/value cache with one row per running sequence.

HF's cache concatenates on every step (10 % of a CPU decode step, measured); this one writes in
place. Rows are batch positions: the engine keeps running sequences in rows 0..B-1 and fills a
hole left by a finished sequence by moving the last row into it, so a decode step reads a
contiguous slice and never gathers.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, n_head: int, head_dim: int, max_positions: int,
                 dtype: torch.dtype, device: torch.device, rows: int = 4, positions: int = 64,
                 full: bool = False) -> None:
        """`full`: allocate `rows` rows of the whole context now and never grow (the engine's
        choice on CUDA, where CUDA graphs read the cache at a fixed address: a cache that moved
        would re-record, or recompile, early in serving; GPT-2 124M in fp16, 32 rows: 1.2 GB)."""
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.max_positions = max_positions
        self.dtype, self.device = dtype, device
        self.full = full
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._alloc(rows, max_positions if full else min(positions, max_positions))

    @torch.inference_mode()  # always inference tensors, wherever it grows: a compiled step's guards see one kind
    def _alloc(self, rows: int, positions: int) -> None:
        # One position more than the capacity: the static step attends up to a length bucket that
        # is at most the capacity, so that length never equals the tensors' own. Inductor guards a
        # compiled graph on whichever of `==` / `!=` it saw, and the other one recompiled mid-serving.
        shape = (rows, self.n_head, positions + 1, self.head_dim)
        old_k, old_v = self.keys, self.values
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]
        for layer, (k, v) in enumerate(zip(old_k, old_v, strict=True)):
            r, t = min(rows, k.shape[0]), min(positions, k.shape[2])
            self.keys[layer][:r, :, :t] = k[:r, :, :t]
            self.values[layer][:r, :, :t] = v[:r, :, :t]

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, positions) that fit; the tensors hold one unused position more (see `_alloc`)."""
        return self.keys[0].shape[0], self.keys[0].shape[2] - 1

    def reserve(self, rows: int, positions: int) -> None:
        """Grow (by doubling) so that `rows` rows of `positions` positions fit."""
        if positions > self.max_positions:
            raise ValueError(f"{positions} positions exceed the model's context of {self.max_positions}")
        cap_rows, cap_pos = self.capacity
        if rows <= cap_rows and positions <= cap_pos:
            return
        if self.full:
            raise ValueError(f"{rows} rows exceed the cache's fixed {cap_rows} (the engine's max_batch_size)")
        while cap_rows < rows:
            cap_rows *= 2
        while cap_pos < positions:
            cap_pos = min(cap_pos * 2, self.max_positions)
        self._alloc(cap_rows, cap_pos)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (filling a hole)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def clear_row(self, row: int, start: int = 0) -> None:
        """Zero positions `start:` of `row`. Masked attention still multiplies stale values by a
        zero weight, and 0 * NaN is NaN: a row that failed with non-finite values must not leave
        them behind for the next sequence in its row."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[row, :, start:] = 0
            v[row, :, start:] = 0
