"""The block manager (prefix cache, LRU) and the scheduler (admission, chunked prefill, preemption, cancel),
torch-free, driven by a fake engine that 'computes' tokens and appends a generated one."""
import pytest

from hybrid.runtime.blocks import BlockManager
from hybrid.runtime.scheduler import FINISHED, RUNNING, WAITING, PoolTooSmall, Scheduler, Sequence


def seq(i, prompt, new=4):
    return Sequence(i, len(prompt), list(prompt), len(prompt) + new, payload=new)


def run_step(s: Scheduler, next_token=lambda q: 1000 + q.n_generated):
    """What the engine does after a forward step: mark computed, append a token where all were computed,
    finish a sequence that generated its `payload` tokens."""
    work = s.schedule()
    for q, n in work:
        ready = q.to_compute == n
        s.computed(q, n)
        if ready:
            q.tokens.append(next_token(q))
            if q.n_generated >= q.payload:
                s.finish(q)
    return work


def drain(s: Scheduler, limit=1000):
    steps = []
    while not s.idle and len(steps) < limit:
        steps.append([(q.id, n) for q, n in run_step(s)])
    assert s.idle
    return steps


def test_prefix_blocks_are_reused_and_lru_keeps_them():
    bm = BlockManager(n_blocks=8, block_size=4)
    a = []
    assert bm.admit(a, list(range(10))) == 0 and bm.grow(a, 10) and len(a) == 3
    bm.seal(a, list(range(10)), 10)                       # blocks 0-3 and 4-7 are full: keyed
    bm.release(a)
    assert bm.available == 8 and len(bm.idle) == 2        # two cached, nobody uses them
    b = []
    assert bm.admit(b, list(range(9)) + [99]) == 8         # both full blocks reused
    assert bm.admit([], [0, 1, 2, 3]) == 0                 # a fully cached prompt keeps its last block to compute
    c = []
    assert bm.admit(c, [0, 1, 2, 5, 6]) == 0               # a different first block: no reuse
    assert bm.stats.hit_tokens == 8 and bm.stats.queries == 4


def test_the_pool_takes_back_the_least_recently_released_cached_block():
    bm = BlockManager(n_blocks=3, block_size=2)
    for ids in ([1, 2, 9], [3, 4, 9]):                    # each leaves one full block cached
        t = []
        bm.admit(t, ids)
        bm.grow(t, 3)
        bm.seal(t, ids, 3)
        bm.release(t)
    assert len(bm.idle) == 2 and len(bm.free) == 1
    t = []
    assert bm.grow(t, 4) and bm.stats.evictions == 1       # the free block, then [1, 2]'s cached block
    assert bm.admit([], [1, 2, 7]) == 0 and bm.admit([], [3, 4, 7]) == 2


def test_chunked_prefill_never_stalls_running_requests():
    s = Scheduler(BlockManager(64, 4), max_batch=4, max_batch_tokens=8)
    s.add(seq(0, [1, 2, 3], new=6))
    run_step(s)                                             # 0 prefilled, running
    s.add(seq(1, list(range(100, 130)), new=2))             # a long prompt arrives
    steps = drain(s)
    for work in steps:
        ids = dict(work)
        assert sum(ids.values()) <= 8
        if 0 in ids and 1 in ids:
            assert ids[0] == 1                              # 0 decodes one token in every step ...
    assert [w for w in steps if 1 in dict(w) and dict(w)[1] > 1][0][0] == (0, 1)   # ... and goes first
    assert sum(dict(w).get(1, 0) for w in steps) == 30 + 1  # the prompt in chunks, then one decode


def test_admission_respects_max_batch_and_fcfs():
    s = Scheduler(BlockManager(64, 4), max_batch=2, max_batch_tokens=64)
    seqs = [seq(i, [i, i + 1], new=3) for i in range(4)]
    for q in seqs:
        s.add(q)
    first = run_step(s)
    assert [q.id for q, _ in first] == [0, 1] and [q.status for q in seqs] == [RUNNING, RUNNING, WAITING, WAITING]
    drain(s)
    assert all(q.status == FINISHED and q.n_generated == 3 for q in seqs)


def test_preemption_when_blocks_run_out_requeues_and_the_pool_is_full_again():
    bm = BlockManager(n_blocks=6, block_size=2)
    s = Scheduler(bm, max_batch=4, max_batch_tokens=64)
    a, b = seq(0, [1, 2, 3], new=6), seq(1, [4, 5, 6], new=6)   # each needs 5 blocks in the end: both can't
    s.add(a)
    s.add(b)
    drain(s)
    assert s.stats.preempted >= 1 and b.preemptions >= 1 and a.preemptions == 0   # the newest one yields
    assert a.tokens[3:] == b.tokens[3:] == [1000, 1001, 1002, 1003, 1004, 1005]    # nothing lost by recompute
    assert bm.in_use == 0 and bm.available == 6


def test_a_request_larger_than_the_pool_is_refused_at_once():
    s = Scheduler(BlockManager(4, 4), max_batch=2, max_batch_tokens=64)
    with pytest.raises(PoolTooSmall, match="needs KV cache for 17 tokens .* holds 16 tokens"):
        s.add(seq(0, list(range(13)), new=4))
    s.add(seq(1, list(range(12)), new=4))                    # exactly the pool: runs alone
    drain(s)


def test_cancel_frees_blocks_at_the_next_step():
    bm = BlockManager(16, 4)
    s = Scheduler(bm, max_batch=4, max_batch_tokens=64)
    a, b, c = seq(0, [1] * 9, new=50), seq(1, [2] * 9, new=50), seq(2, [3] * 9, new=50)
    for q in (a, b):
        s.add(q)
    run_step(s)
    s.add(c)
    s.cancel(a)
    s.cancel(c)                                              # still waiting
    run_step(s)
    assert a.status == c.status == FINISHED and s.stats.cancelled == 2 and s.running == [b]
    assert bm.in_use == len(b.table)
    s.cancel(b)
    s.schedule()
    assert s.idle and bm.in_use == 0
