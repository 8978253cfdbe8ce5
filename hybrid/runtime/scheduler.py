"""The scheduler: which sequences run in the next forward step, and how many of their tokens. Torch-free.

Each step carries, within `max_batch` sequences and `max_batch_tokens` tokens:
  1. every running sequence's next tokens, oldest first: one for a decoding sequence, a chunk of the prompt
     for one still in prefill (chunked prefill: a long prompt takes several steps and never stalls the others);
  2. then waiting sequences, first come first served, admitted while the token budget and the KV blocks last:
     each starts from the longest cached prefix of its prompt (BlockManager.admit) and computes the rest.
When a running sequence needs a block and the pool has none, the newest running sequence is preempted: its
blocks are released (the full ones stay in the prefix cache) and it waits at the head of the queue to be
recomputed from its prompt and the tokens it has generated so far. A sequence that could never fit the pool
is refused when it is added. Cancelled sequences leave at the next schedule() and free their blocks.

    s = Scheduler(BlockManager(n_blocks, block_size), max_batch=8, max_batch_tokens=512)
    s.add(seq); work = s.schedule()       # [(seq, n_tokens)]; the engine runs them, then for each:
    s.computed(seq, n)                    # ... and, once it has sampled a token: seq.append(t) / s.finish(seq)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hybrid.runtime.blocks import BlockManager

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class PoolTooSmall(ValueError):
    """The request needs more KV cache than the whole pool holds: it could never run."""


@dataclass(eq=False)
class Sequence:
    """One request's tokens and cache. `payload` is the engine's (sampler, limits, callbacks)."""
    id: int
    prompt_len: int
    tokens: list[int]                         # prompt, then generated tokens
    max_tokens: int                           # prompt + new tokens it may reach (sizes the refusal check)
    payload: Any = None
    table: list[int] = field(default_factory=list)     # block ids
    n_computed: int = 0                       # tokens whose cache rows are written
    cached_tokens: int = 0                    # prompt tokens served by the prefix cache at first admission
    status: str = WAITING
    cancelled: bool = False
    preemptions: int = 0

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def to_compute(self) -> int:
        return len(self.tokens) - self.n_computed

    @property
    def prefilling(self) -> bool:
        """Still computing tokens that were given (prompt, or recomputation after a preemption)."""
        return self.to_compute > 1


@dataclass
class SchedulerStats:
    admitted: int = 0
    preempted: int = 0
    cancelled: int = 0
    finished: int = 0


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int = 8, max_batch_tokens: int = 512):
        if max_batch < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch ({max_batch}) and max_batch_tokens ({max_batch_tokens}) must be >= 1")
        self.blocks, self.max_batch, self.max_batch_tokens = blocks, max_batch, max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    # ---- queue --------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        need, have = self.blocks.blocks_for(seq.max_tokens), self.blocks.n_blocks
        if need > have:
            raise PoolTooSmall(
                f"this request needs KV cache for {seq.max_tokens} tokens ({need} blocks of "
                f"{self.blocks.block_size}) but the whole pool holds {have * self.blocks.block_size} tokens; "
                f"lower max_tokens or the prompt, or start with a larger --context")
        seq.status = WAITING
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Mark it; it leaves (and frees its blocks) at the next schedule()."""
        seq.cancelled = True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ---- one step ---------------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's work: [(sequence, tokens to compute)], running ones first (see the module doc)."""
        self.drop_cancelled()
        work: list[tuple[Sequence, int]] = []
        budget = self.max_batch_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != RUNNING:          # preempted by an older one in this loop
                continue
            n = min(seq.to_compute, budget)
            if not self._room(seq, n, work):
                continue                       # it was preempted itself
            work.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not seq.table:
                hit = self.blocks.admit(seq.table, seq.tokens)
                seq.n_computed = hit
                if seq.preemptions == 0:
                    seq.cached_tokens = hit
            n = min(seq.to_compute, budget)
            if not self.blocks.grow(seq.table, seq.n_computed + n):
                if not self.running and not work:       # nothing else holds blocks: take what fits
                    n = self._largest_fit(seq, n)
                if n == 0 or not self.blocks.grow(seq.table, seq.n_computed + n):
                    self.blocks.release(seq.table)      # wait for blocks; the cached prefix stays cached
                    seq.n_computed = 0
                    break
            self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            self.stats.admitted += 1
            work.append((seq, n))
            budget -= n
        return work

    def computed(self, seq: Sequence, n: int) -> None:
        """The step wrote n more of seq's cache rows: full blocks join the prefix cache."""
        seq.n_computed += n
        self.blocks.seal(seq.table, seq.tokens, seq.n_computed)

    def finish(self, seq: Sequence) -> None:
        seq.status = FINISHED
        self.running.remove(seq)
        self.blocks.release(seq.table)
        self.stats.finished += 1

    # ---- internals --------------------------------------------------------------------------------------
    def _room(self, seq: Sequence, n: int, work: list) -> bool:
        """Blocks for seq's next n tokens, preempting the newest other running sequences if needed.
        False when seq itself had to be preempted."""
        while not self.blocks.grow(seq.table, seq.n_computed + n):
            victims = [s for s in self.running if s is not seq and all(s is not w for w, _ in work)]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.n_computed = 0
        seq.status = WAITING
        seq.preemptions += 1
        self.stats.preempted += 1
        self.waiting.appendleft(seq)

    def _largest_fit(self, seq: Sequence, n: int) -> int:
        room = (len(seq.table) + self.blocks.available) * self.blocks.block_size - seq.n_computed
        return max(0, min(n, room))

    def drop_cancelled(self) -> None:
        """Cancelled sequences leave the queues and free their blocks."""
        for seq in [s for s in self.running if s.cancelled]:
            self.finish(seq)
            self.stats.cancelled += 1
            self.stats.finished -= 1
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self.blocks.release(seq.table)
            seq.status = FINISHED
            self.stats.cancelled += 1
