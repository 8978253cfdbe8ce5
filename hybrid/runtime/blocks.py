"""The KV cache's block table and prefix cache. Torch-free: block ids only; the rows live in KVPool.

The compressed MLA cache (576 values per token per layer for K2) is cut into blocks of `block_size` tokens.
A sequence owns a list of block ids (its block table); token i sits in block table[i // block_size] at
offset i % block_size. Blocks come from one free list, so sequences of any length share device memory
without fragmentation.

Prefix cache: a block that is full is keyed by a hash of ALL token ids up to its end (chained: the hash of
the previous block and this block's ids), so a key names one exact prefix. A new sequence reuses every
leading block whose key is cached (reference counted) and computes only the rest. A block whose last user
is gone keeps its key and rows and waits in LRU order; the pool takes the least recently used one back
only when it has no plain free block left.

    bm = BlockManager(n_blocks=64, block_size=16)
    hit = bm.admit(seq_blocks, prompt)        # -> tokens reused from the cache (a multiple of block_size)
    bm.grow(seq_blocks, n_tokens)             # blocks for the first n_tokens tokens (False: the pool is full)
    bm.seal(seq_blocks, tokens)               # register the keys of blocks that became full
    bm.release(seq_blocks)                    # the sequence is done (or preempted)
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class PoolFull(Exception):
    """No free block and no cached block to take back."""


@dataclass
class PrefixStats:
    queries: int = 0           # sequences admitted with the prefix cache on
    query_tokens: int = 0      # prompt tokens they brought
    hit_tokens: int = 0        # tokens served from cached blocks
    evictions: int = 0         # cached blocks taken back for new use


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int, prefix_cache: bool = True):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV pool needs at least one block of at least one token; got {n_blocks} blocks "
                             f"of {block_size}")
        self.n_blocks, self.block_size, self.prefix_cache = n_blocks, block_size, prefix_cache
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))   # a stack: block 0 is handed out first
        self.refs = [0] * n_blocks
        self.key_of: list[int | None] = [None] * n_blocks         # the prefix key of a full, registered block
        self.tokens_of: list[tuple[int, ...] | None] = [None] * n_blocks   # its ids, checked on a hit
        self.by_key: dict[int, int] = {}                           # key -> block id
        self.idle: OrderedDict[int, None] = OrderedDict()          # cached blocks nobody uses, oldest first
        self.stats = PrefixStats()

    # ---- sizes ------------------------------------------------------------------------------------------
    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def available(self) -> int:
        """Blocks a sequence could get now: free ones and cached ones nobody uses."""
        return len(self.free) + len(self.idle)

    @property
    def in_use(self) -> int:
        return self.n_blocks - self.available

    # ---- a sequence's life ----------------------------------------------------------------------------
    def admit(self, table: list[int], prompt: list[int]) -> int:
        """Start a sequence's (empty) block table with the cached blocks of its prompt's longest cached prefix.
        Returns the number of prompt tokens those blocks hold. At least one prompt token is always left to
        compute (its logits start the generation), so a fully cached prompt reuses all but its last block."""
        assert not table, "admit() starts a table"
        if not self.prefix_cache:
            return 0
        self.stats.queries += 1
        self.stats.query_tokens += len(prompt)
        bs, key = self.block_size, None
        for i in range((len(prompt) - 1) // bs):
            ids = tuple(prompt[i * bs:(i + 1) * bs])
            key = _key(key, ids)
            b = self.by_key.get(key)
            if b is None or self.tokens_of[b] != ids:
                break
            self._take(b)
            table.append(b)
        hit = len(table) * bs
        self.stats.hit_tokens += hit
        return hit

    def grow(self, table: list[int], n_tokens: int) -> bool:
        """Give `table` enough blocks for its first n_tokens tokens. False (nothing taken) when the pool cannot."""
        need = self.blocks_for(n_tokens) - len(table)
        if need <= 0:
            return True
        if need > self.available:
            return False
        for _ in range(need):
            table.append(self._fresh())
        return True

    def seal(self, table: list[int], tokens: list[int], n_computed: int) -> None:
        """Register the prefix keys of the table's blocks that are full of computed tokens (tokens[:n_computed])."""
        if not self.prefix_cache:
            return
        bs, key = self.block_size, None
        for i in range(min(n_computed // bs, len(table))):
            ids = tuple(tokens[i * bs:(i + 1) * bs])
            key = _key(key, ids)
            b = table[i]
            if self.key_of[b] is not None:
                continue                     # already registered (reused or sealed before)
            if key in self.by_key:           # another sequence computed the same prefix first: keep one
                continue
            self.key_of[b], self.tokens_of[b] = key, ids
            self.by_key[key] = b

    def release(self, table: list[int]) -> None:
        """The sequence is done or preempted: its blocks lose a user; registered ones stay cached (LRU)."""
        for b in reversed(table):            # the tail first, so a prefix outlives its extensions in the LRU
            self.refs[b] -= 1
            assert self.refs[b] >= 0
            if self.refs[b] == 0:
                if self.key_of[b] is not None:
                    self.idle[b] = None
                else:
                    self.free.append(b)
        table.clear()

    # ---- internals --------------------------------------------------------------------------------------
    def _take(self, b: int) -> None:
        if self.refs[b] == 0:
            self.idle.pop(b, None)
        self.refs[b] += 1

    def _fresh(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.idle:
            b, _ = self.idle.popitem(last=False)       # the least recently released cached block
            del self.by_key[self.key_of[b]]
            self.key_of[b] = self.tokens_of[b] = None
            self.stats.evictions += 1
        else:
            raise PoolFull("no free KV block")
        self.refs[b] = 1
        return b


def _key(prev: int | None, ids: tuple[int, ...]) -> int:
    """The key of a block: its ids chained to the key of the blocks before it (ints and tuples hash the same
    in every process; a hit is also checked against the stored ids)."""
    return hash((prev, ids))
