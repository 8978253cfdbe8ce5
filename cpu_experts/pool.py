"""A tiny pool of worker threads that run nogil Numba kernels on disjoint row ranges.

Why not Numba's parallel=True: see cpu_experts/jit.py. Each task is (function, args, r0, r1) with a
contiguous row range per thread; run() blocks until all threads finished their part, so a call is
also a barrier between the gate/up and down phases.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


def split(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """[0, n) cut into `parts` contiguous ranges whose bounds are multiples of `align` (except n)."""
    step = -(-n // parts)
    step = -(-step // align) * align
    return [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, 0)]


class RowPool:
    def __init__(self, threads: int):
        if threads < 1:
            raise ValueError(f"threads={threads}; use 1 or more")
        self.threads = threads
        self._ex = ThreadPoolExecutor(threads - 1, thread_name_prefix="cpu_experts") if threads > 1 else None

    def run(self, fn, args: tuple, n_rows: int, align: int = 1, start: int = 0) -> None:
        """Call fn(*args[:-1], r0, r1, args[-1]) for contiguous ranges covering [start, start + n_rows)."""
        *head, last = args
        ranges = [(start + a, start + b) for a, b in split(n_rows, self.threads, align)]
        futs = [self._ex.submit(fn, *head, a, b, last) for a, b in ranges[1:]] if self._ex else []
        a, b = ranges[0]
        fn(*head, a, b, last)
        for f in futs:
            f.result()

    def close(self) -> None:
        if self._ex:
            self._ex.shutdown(wait=True)
