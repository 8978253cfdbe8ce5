"""RowPool: every row of a call is computed exactly once, on every split; errors in a worker reach the
caller; two threads sharing a pool take turns; close() stops the workers. The flags-and-semaphores
hand-off (cpu_experts/spin.py) is exercised with and without spinning."""
import threading

import numpy as np
import pytest

from cpu_experts.jit import kernel
from cpu_experts.pool import RowPool, split


@kernel
def _mark(a, r0, r1, out):
    for r in range(r0, r1):
        out[r] += a[r]


@kernel
def _fail_past(limit, r0, r1, out):
    if r1 > limit:
        raise ValueError("row past the limit")
    for r in range(r0, r1):
        out[r] = 1.0


def test_split_covers_every_row_once():
    for n in (0, 1, 5, 16, 17, 300, 576):
        for parts in (1, 2, 3, 7):
            for align in (1, 16, 128):
                r = split(n, parts, align)
                assert len(r) <= parts and r[0][0] == 0 and r[-1][1] == max(n, 0)
                assert all(a < b or n == 0 for a, b in r) and all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))
                assert all(a % align == 0 for a, _ in r)


@pytest.mark.parametrize("threads, spin_us", [(2, 0.0), (3, 0.0), (2, 20.0)])
def test_every_row_once_over_many_calls(threads, spin_us):
    pool = RowPool(threads, spin_us=spin_us)
    rng = np.random.default_rng(threads)
    try:
        for i in range(400):                         # back-to-back calls of every size, some on fewer threads
            n = int(rng.integers(0, 70))
            a = rng.random(n)
            out = np.zeros(n)
            pool.run(_mark, (a, out), n, align=int(rng.choice([1, 4])), parts=int(rng.integers(1, threads + 1)))
            np.testing.assert_array_equal(out, a)
    finally:
        pool.close()
        pool.close()                                 # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(_mark, (np.zeros(8), np.zeros(8)), 8)


def test_a_workers_error_reaches_the_caller_and_the_pool_goes_on():
    pool = RowPool(2)
    out = np.zeros(10)
    with pytest.raises(ValueError, match="row past the limit"):
        pool.run(_fail_past, (5, out), 10)           # the worker's range [5, 10) fails
    pool.run(_fail_past, (10, out), 10)
    np.testing.assert_array_equal(out, 1.0)
    pool.close()


def test_two_callers_share_one_pool():
    pool = RowPool(2)
    bad = []

    def caller(seed):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            a = rng.random(64)
            out = np.zeros(64)
            pool.run(_mark, (a, out), 64)
            if not np.array_equal(out, a):
                bad.append(seed)
    ts = [threading.Thread(target=caller, args=(s,)) for s in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    pool.close()
    assert not bad
