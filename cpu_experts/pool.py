"""A tiny pool of worker threads that run nogil Numba kernels on disjoint row ranges.

Why not Numba's parallel=True: see cpu_experts/jit.py. Each call is (function, args, rows) with one
contiguous row range per thread; run() blocks until all threads finished their part, so a call is also a
barrier (between the gate/up and down phases of the experts, between one dense layer and the next).
The calling thread runs the first range itself. The routed experts and the dense layers share one pool
(the caller passes it), so the machine's cores are never given out twice; run() takes a lock, so two
threads calling one pool take turns.

The hand-off (cpu_experts/spin.py) is a flag and a semaphore per thread, waited on in nogil Numba code:
7.6 us per call of a no-op kernel on 2 threads (median 15.6 us on this shared, loaded 2-core machine)
against 34.9 (42.5) us for the ThreadPoolExecutor it replaces, measured interleaved in one run. Workers
can also spin `spin_us` between calls before they sleep: that can only pay on cores nothing else wants;
here, with other tenants' processes on both cores, it cost more than it saved (spin_us=5: 25.7 us, 30: 116 us:
a spinning thread holds the core that the thread it waits for needs), so the default is 0.
"""
from __future__ import annotations

import threading

from cpu_experts import spin

SPIN_US = 0.0             # a worker's spin after each call before it sleeps (and the caller's for the parts)
START_DELAY_US = 1.5      # with spinning: a worker that sees a call waits this long before it takes the GIL,
#                           the caller's dispatch of its own part (a GIL taken on the way costs a futex wake-up)


def split(n: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """[0, n) cut into `parts` contiguous ranges whose bounds are multiples of `align` (except n)."""
    if n <= 0:
        return [(0, 0)]
    step = -(-n // parts)
    step = -(-step // align) * align
    return [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, 0)]


_STOP = object()



MAX_THREADS = 256      # RuntimeOptions checks the same bound (hybrid/core/options.py) before any thread starts

class RowPool:
    def __init__(self, threads: int, spin_us: float = SPIN_US):
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads={threads}; use 1 to {MAX_THREADS}")
        if spin_us < 0:
            raise ValueError(f"spin_us={spin_us}; use 0 (never spin) or more")
        self.threads = threads
        n = threads - 1
        rate = spin.pauses_per_us() if n and spin_us else 0.0
        self._spins, self._delay = int(spin_us * rate), int(START_DELAY_US * rate) if spin_us else 0
        self._flags = spin.new_flags(n)
        self._sems = spin.new_semaphores(1 + n)
        self._gen = 0
        self._tasks: list = [None] * n
        self._errors: list = [None] * n
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, args=(i,), name=f"cpu_experts-{i + 1}", daemon=True)
                         for i in range(n)]
        for t in self._workers:
            t.start()

    def run(self, fn, args: tuple, n_rows: int, align: int = 1, start: int = 0, parts: int | None = None) -> None:
        """Call fn(*args[:-1], r0, r1, args[-1]) for contiguous ranges covering [start, start + n_rows).

        parts: at most this many threads (None: all); 1 runs on the calling thread alone, with no hand-off
        (for products too small to pay for one).
        """
        *head, last = args
        if parts == 1 or self.threads == 1:               # no hand-off: the cheapest call there is
            fn(*head, start, start + max(n_rows, 0), last)
            return
        ranges = [(start + a, start + b) for a, b in split(n_rows, min(parts or self.threads, self.threads), align)]
        if len(ranges) == 1:
            fn(*head, *ranges[0], last)
            return
        with self._lock:
            if not self._workers:
                raise RuntimeError("this RowPool is closed; make a new one")
            for i, r in enumerate(ranges[1:]):
                self._tasks[i] = (fn, (*head, *r, last))
            self._gen += 1
            value = self._gen << 8 | (len(ranges) - 1)
            spin.kick(self._flags, value, self._sems)
            try:
                fn(*head, *ranges[0], last)
            finally:
                spin.await_done(self._flags, value, self._spins, self._sems)
                errors = [e for e in self._errors if e is not None]
                self._errors = [None] * len(self._errors)
            if errors:
                raise errors[0]

    def _work(self, i: int) -> None:
        seen = 0
        while True:
            seen = spin.worker_wait(self._flags, seen, i, self._spins, self._delay, self._sems)
            fn, args = self._tasks[i]
            if fn is _STOP:
                return
            try:
                fn(*args)
            except BaseException as e:                  # re-raised by run() in the calling thread
                self._errors[i] = e

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            if not self._workers:
                return
            self._tasks = [(_STOP, ())] * len(self._tasks)
            self._gen += 1
            spin.kick(self._flags, self._gen << 8 | len(self._tasks), self._sems)
            for t in self._workers:
                t.join()
            self._workers = []
