"""One forward step over several sequences, and the paged compressed KV cache it reads and writes.

T = tokens of the step (all sequences, in order), S = cache rows one sequence attends, D = r + dr.

    KVPool: kv [layers, n_blocks * block_size, D] on the device. Slot s = block * block_size + offset. A device
            map keeps one per device for its own layers (hybrid/runtime/device_map.py: KVPools).
    Batch:  ids, positions, slots [T] (where each token's cache row goes) and one Segment per sequence:
            its rows of T, the cache slots of its positions 0..S-1 (a plain range when its blocks are
            consecutive, so attention reads a view instead of gathering a copy), and the attention form
            (absorbed for one new token, expanded for a chunk of prompt).
build_batch() turns the scheduler's [(Sequence, n_tokens)] into a Batch with a few small host->device copies.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hybrid.runtime.scheduler import Sequence


class KVPool:
    """The compressed MLA cache of every layer, in blocks (hybrid/runtime/blocks.py keeps the tables)."""

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, width: int, dtype: torch.dtype,
                 device: torch.device):
        self.n_blocks, self.block_size = n_blocks, block_size
        self.kv = torch.zeros(n_layers, n_blocks * block_size, width, dtype=dtype, device=device)

    def layer(self, i: int) -> torch.Tensor:
        return self.kv[i]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class Segment:
    """One sequence's part of a step."""
    start: int                              # first row of T
    length: int                             # rows of T (tokens computed now)
    context: int                            # cache rows attended: positions 0..context-1
    first_slot: int                         # >= 0: the context is slots first_slot..+context (a view)
    ctx_slots: torch.Tensor | None          # else: the slots to gather, [context] long on the device
    absorbed: bool                          # MLA's absorbed form (one new token) or expanded (a chunk)

    def to(self, device: torch.device) -> "Segment":
        if self.ctx_slots is None:
            return self
        return replace(self, ctx_slots=self.ctx_slots.to(device))

    def rows(self, kv: torch.Tensor) -> torch.Tensor:
        """This segment's context rows [S, D] from one layer's cache."""
        if self.ctx_slots is None:
            return kv[self.first_slot:self.first_slot + self.context]
        return kv.index_select(0, self.ctx_slots)


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor                       # [T] long
    positions: torch.Tensor                 # [T] long
    slots: torch.Tensor                     # [T] long: where each token's cache row is written
    segments: tuple[Segment, ...]
    max_pos: int                            # the largest position (host int: no device sync)
    phase: str                              # "decode" when every segment is one generated token, else "prefill"

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device) -> "Batch":
        """The same step with its index tensors on `device` (the next device of a map); itself when there."""
        if self.positions.device == device:
            return self
        return replace(self, ids=self.ids.to(device), positions=self.positions.to(device),
                       slots=self.slots.to(device), segments=tuple(s.to(device) for s in self.segments))


def build_batch(work: list[tuple[Sequence, int]], block_size: int, device: torch.device,
                absorbed: bool | None = None) -> Batch:
    """A Batch for the scheduler's work. absorbed: force MLA's form for every segment (tests); None = by
    segment (one token absorbed, several expanded)."""
    ids, pos, slots, segments = [], [], [], []
    decode = True
    for seq, n in work:
        a, b = seq.n_computed, seq.n_computed + n
        ids += seq.tokens[a:b]
        pos += range(a, b)
        t = seq.table
        slots += [t[p // block_size] * block_size + p % block_size for p in range(a, b)]
        decode &= n == 1 and a >= seq.prompt_len
        segments.append(_segment(sum(s.length for s in segments), n, b, t, block_size, device,
                                 n == 1 if absorbed is None else absorbed))
    as_t = lambda v: torch.tensor(v, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
    return Batch(as_t(ids), as_t(pos), as_t(slots), tuple(segments), max(pos), "decode" if decode else "prefill")


def _segment(start: int, n: int, context: int, table: list[int], bs: int, device: torch.device,
             absorbed: bool) -> Segment:
    used = table[: -(-context // bs)]
    if used == list(range(used[0], used[0] + len(used))):      # consecutive blocks: one slice of the cache
        return Segment(start, n, context, used[0] * bs, None, absorbed)
    blocks = torch.tensor(used, dtype=torch.long)
    slots = (blocks[:, None] * bs + torch.arange(bs)[None, :]).reshape(-1)[:context]
    return Segment(start, n, context, -1, slots.to(device, non_blocking=True), absorbed)
