"""The running batch: the sequences a decode step runs, in the order of the KV-cache rows they own.

Row i of the batch owns cache row i, so a decode step reads one contiguous slice of the cache
and never gathers. As in LoRAX's `CausalLMBatch` the batch is a type with two ways to change:
sequences join at the end once their prefill wrote their cache rows (`reserve`, then `add`: its
`concatenate`), and leave one at a time (`remove`: its `filter`), the last row moving into the
hole with its cache positions, so rows stay contiguous. A row that failed may have written
NaN/inf into its keys and values: the positions it leaves are zeroed, because masked attention
still multiplies stale values by a zero weight and 0 * NaN is NaN.

The batch also builds each forward's inputs: right-padded prompts for a prefill
(`padded`), one token and position per row for a decode (`Batch.decode_inputs`), and the
gate matrix of any rows (`gate_matrix`: adapter versions -> compute slots -> `[B, active]`),
which the engine applies to the LoRA layers for that forward alone (`LoRABatchContext.applied`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from server.engine.kv_cache import KVCache
from server.engine.lora_layer import ArrowRows
from server.engine.registry import AdapterVersion
from server.engine.sequence import Sequence
from server.engine.slots import SlotManager

# What `LoRABatchContext.applied` takes: active slots, gates [B, active], rows with a gate (None = all)
Gates = tuple[tuple[int, ...], torch.Tensor | None, torch.Tensor | None]
NO_GATES: Gates = ((), None, None)


class Batch:
    """The running sequences, `seqs[i]` owning cache row i (engine thread only)."""

    def __init__(self, cache: KVCache, device: torch.device) -> None:
        self.cache, self.device = cache, device
        self._seqs: list[Sequence] = []

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._seqs)

    def __contains__(self, seq: object) -> bool:
        return any(s is seq for s in self._seqs)

    @property
    def seqs(self) -> list[Sequence]:
        """The rows in cache-row order (a copy: the batch changes as rows leave)."""
        return list(self._seqs)

    def row_of(self, seq: Sequence) -> int:
        for row, s in enumerate(self._seqs):
            if s is seq:
                return row
        raise ValueError(f"sequence {seq.id} is not in the batch")

    # -- joining ------------------------------------------------------------------------------------
    def reserve(self, seqs: list[Sequence], max_positions: int) -> int:
        """Grow the cache so that `seqs` fit after the current rows (prompt and tokens to come,
        up to the context); returns the first of their rows, which their prefill writes."""
        row = len(self._seqs)
        need = max(min(len(s.prompt_ids) + s.max_tokens, max_positions) for s in seqs)
        self.cache.reserve(row + len(seqs), need)
        return row

    def add(self, seqs: list[Sequence]) -> None:
        """`seqs` own the rows `reserve` gave them from now on (their prefill wrote them)."""
        self._seqs.extend(seqs)

    # -- leaving ------------------------------------------------------------------------------------
    def remove(self, seq: Sequence, scrub: bool = False) -> None:
        """Take `seq`'s row out, filling the hole with the last row (its cache positions with it);
        `scrub`: zero the positions of the hole no live sequence holds (for a failed row)."""
        row = self.row_of(seq)
        last = len(self._seqs) - 1
        kept = 0  # positions of `row` that hold a live sequence's keys/values after this
        if row != last:
            moved = self._seqs[last]
            self.cache.move_row(last, row, moved.position)
            self._seqs[row] = moved
            kept = moved.position
        self._seqs.pop()
        if scrub:
            self.cache.clear_row(row, kept)

    def discard(self, seq: Sequence) -> None:
        """Drop `seq` (if still here) without touching the cache: only when moving rows itself
        failed, on shutdown."""
        self._seqs = [s for s in self._seqs if s is not seq]

    # -- inputs -------------------------------------------------------------------------------------
    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's last token and its position, [B, 1] each, for one decode step: built on the
        host and sent in one copy (pinned and asynchronous on CUDA, see `to_device`)."""
        both = to_device(torch.tensor([[s.generated[-1], s.position] for s in self._seqs]), self.device)  # [B, 2]
        return both[:, :1], both[:, 1:]

    def top_position(self, rows: int) -> int:
        """The furthest position rows 0..rows-1 decode at, from the host (reading it off the
        device tensor would sync)."""
        return max(s.position for s in self._seqs[:rows])


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To CUDA through page-locked memory with `non_blocking`: a copy
    from pageable memory blocks the host until the GPU has drained its queue (a host sync per
    step); from pinned memory it is queued behind the work already there, in stream order."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], positions [B, T] and each row's last real index [B]. Pad tokens
    write keys/values past a row's end, which its later tokens overwrite before reading."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [B, T]
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(p)
    pos = torch.arange(width).expand(len(prompts), width)  # [B, T]
    last = torch.tensor([len(p) - 1 for p in prompts])  # [B]
    return to_device(ids, device), to_device(pos.contiguous(), device), to_device(last, device)


def gate_matrix(seqs: list[Sequence], slots: SlotManager, dtype: torch.dtype, device: torch.device) -> Gates:
    """The compute slots `seqs` use (filled here if needed) and their `[B, active]` gate matrix,
    one row per sequence, one column per adapter version with a non-zero gate in any row.
    A gate that is NaN or does not fit `dtype` is that row's fault: ValueError."""
    versions: list[AdapterVersion] = []
    column: dict[int, int] = {}  # AdapterVersion.version -> its column
    for seq in seqs:
        for name, w in seq.route.gates.items():
            v = seq.versions[name]
            if w != 0.0 and v.version not in column:
                column[v.version] = len(versions)
                versions.append(v)
    if not versions:
        return NO_GATES
    slot_list = slots.ensure(versions)
    # columns in slot order, so the same adapters in any row order are the same active set (the
    # layers cache one concatenated stack per active set; rows joining, leaving or moving would
    # otherwise make a new one)
    order = sorted(range(len(versions)), key=lambda i: slot_list[i])
    active = [slot_list[i] for i in order]
    column = {versions[i].version: col for col, i in enumerate(order)}
    largest = torch.finfo(dtype).max
    table = [[0.0] * len(versions) for _ in seqs]  # [B, active], on the host: no tensor read back
    for row, seq in enumerate(seqs):
        for name, w in seq.route.gates.items():
            if not abs(w) <= largest:  # NaN or beyond the serving dtype
                raise ValueError(f"gate {w!r} for adapter {name!r} is not finite in {dtype}")
            if w != 0.0:
                table[row][column[seq.versions[name].version]] = w
    used = [row for row, gates in enumerate(table) if any(g != 0.0 for g in gates)]
    rows = None if len(used) == len(seqs) else to_device(torch.tensor(used, dtype=torch.long), device)
    return tuple(active), to_device(torch.tensor(table, dtype=dtype), device), rows


def per_token_rows(seqs: list[Sequence], gates: torch.Tensor | None, device: torch.device,
                   lengths: list[int] | None = None) -> ArrowRows | None:
    """The rows of `seqs` whose layers gate each token themselves (Arrow: `RoutingSpec.per_token`)
    and that have candidates in `gates`; None when there are none. `lengths`: each row's real
    tokens in this forward (a right-padded prefill), so the weights they report skip the padding."""
    if gates is None:
        return None
    picked = [i for i, s in enumerate(seqs)  # from the host's gates: no device sync
              if s.routing.per_token is not None and any(w > 0 for w in s.route.gates.values())]
    if not picked:
        return None
    specs = [seqs[i].routing.per_token for i in picked]
    return ArrowRows(
        rows=to_device(torch.tensor(picked, dtype=torch.long), device),
        top_k=to_device(torch.tensor([k for k, _ in specs], dtype=torch.long), device),  # type: ignore[misc]
        temperature=to_device(torch.tensor([t for _, t in specs], dtype=torch.float32), device),  # type: ignore[misc]
        lengths=None if lengths is None else to_device(torch.tensor([lengths[i] for i in picked]), device),
        host_rows=picked)


def record_layer_weights(seqs: list[Sequence], arrow: ArrowRows, active: tuple[int, ...],
                         slots: SlotManager) -> None:
    """Give each per-token row the mean weight per adapter its layers chose in this forward
    (`RouteState.layer_weights`, what its trace reports)."""
    means = arrow.mean_weights()  # [a, active]
    if means is None:
        return
    host = means.tolist()  # one read for all the rows (a host sync on a GPU)
    for i, row in enumerate(arrow.host_rows):
        seq = seqs[row]
        weights: dict[str, float] = {}
        for col, w in enumerate(host[i]):
            version = slots.slot_version[active[col]]
            if version is not None and seq.versions.get(version.name) is version and w > 0:
                weights[version.name] = w
        seq.route.layer_weights = weights
