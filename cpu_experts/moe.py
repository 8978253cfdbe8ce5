"""CpuMoE: the CPU forward of routed experts, in two steps (submit, then wait).

T = tokens, k = experts per token, P = (token, expert) pairs, H = hidden, I = inter.

    submit(layer, hidden [T, H], topk_ids [T, k], topk_weights [T, k]) -> Ticket   (returns at once)
    wait(ticket) -> out [T, H] f32 = sum_j w[t, j] * Expert_{ids[t, j]}(hidden[t]);  ids of -1 skipped
    run(layer, hidden, topk_ids, topk_weights) -> out                                (the same, synchronous)

One background thread takes submitted calls in order; it groups the pairs by expert and drives a
RowPool of `threads` threads (itself included) through nogil Numba kernels. Every thread takes a
contiguous range of rows of *every* selected expert (rows x experts), gate/up first, then a barrier,
then down. Which kernels run depends on the layer (paths()): the IR kernels ("int4-int8" / "avx512" / "avx2")
for every call, or the plain Numba kernels with a dequantized-tile GEMM for experts chosen by
>= tile_min_tokens tokens (cpu_experts/experts.py holds both, shared with the dense MLPs).
The caller must not modify `hidden` until wait() returned.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cpu_experts.experts import ExpertLayer, run_fast, run_rows, run_tile, warm_up
from cpu_experts.paths import choose_path
from cpu_experts.pool import RowPool

TILE_MIN_TOKENS = 4      # an expert chosen by at least this many tokens of a call takes the tile path


def physical_cores() -> int:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return int(n or os.cpu_count() or 1)


@dataclass
class Ticket:
    layer: int
    future: Future


class CpuMoE:
    def __init__(self, stores: dict, threads: int | None = None, activations: str = "auto",
                 tile_min_tokens: int = TILE_MIN_TOKENS, kernels: str = "auto", pool: RowPool | None = None):
        """stores: {layer index: LayerStore}. threads: None -> physical cores. pool: run on this RowPool
        (shared with the dense layers, cpu_experts/linear.py; its threads, and close() leaves it open)
        instead of one of our own.

        activations (int4 only): "auto" = int8 activations with VNNI when the CPU has it (default; about
        1e-2 of max|y| from exact on random data, bounded at 4e-2 in the tests), "float" = float32
        activations (exact up to f32 rounding, plain Numba kernels, slow), "int8" = require the VNNI path. kernels: "auto" = AVX-512 IR kernels when available, "plain" = the
        portable Numba kernels only. paths() tells what each layer runs.
        """
        self._own_pool = pool is None
        self._pool = RowPool(physical_cores() if threads is None else int(threads)) if pool is None else pool
        self.threads = self._pool.threads
        self.tile_min_tokens = int(tile_min_tokens)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="cpu_moe")
        self._layers = {int(i): ExpertLayer(s, choose_path(s.spec.fmt, (s.spec.hidden, s.spec.inter), activations,
                                                           kernels)) for i, s in stores.items()}
        self._lock = threading.Lock()
        self._stats = dict(calls=0, tokens=0, activations=0, skipped=0, experts_read=0, bytes_read=0,
                           tile_experts=0, seconds=0.0)
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile (or load from Numba's cache) every kernel for every layer's buffer types, now."""
        seen = set()
        for L in self._layers.values():
            key = (L.store.spec.fmt, L.path, L.buf8.flags.writeable)
            if key not in seen:
                seen.add(key)
                warm_up(self._pool, L)

    # -- public API -------------------------------------------------------------------------------
    def submit(self, layer: int, hidden: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> Ticket:
        """Start the layer's expert forward on the background thread; returns at once (see the module doc)."""
        return Ticket(int(layer), self._worker.submit(self._forward, *self._checked(layer, hidden, topk_ids,
                                                                                    topk_weights)))

    def wait(self, ticket: Ticket) -> np.ndarray:
        return ticket.future.result()

    def run(self, layer: int, hidden: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
        """submit + wait on the calling thread (no hand-off to the background thread): for a caller with
        nothing to overlap, e.g. a CPU-only run that schedules the dense layers and the experts in turn."""
        return self._forward(*self._checked(layer, hidden, topk_ids, topk_weights))

    __call__ = run

    def _checked(self, layer, hidden, topk_ids, topk_weights) -> tuple:
        L = self._layers.get(int(layer))
        if L is None:
            raise KeyError(f"layer {layer} has no CPU expert store; known layers: {sorted(self._layers)}")
        H, n = L.store.spec.hidden, L.store.n_experts
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        ids = np.asarray(topk_ids)
        wts = np.asarray(topk_weights, dtype=np.float32)
        if hidden.ndim != 2 or hidden.shape[1] != H:
            raise ValueError(f"hidden has shape {hidden.shape}; layer {layer} expects [T, {H}]")
        if ids.ndim != 2 or ids.shape[0] != hidden.shape[0] or wts.shape != ids.shape:
            raise ValueError(f"topk_ids {ids.shape} and topk_weights {wts.shape} must both be [T={hidden.shape[0]}, k]")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"topk_ids must be integers (int32/int64), got {ids.dtype}")
        if ids.size and (ids.min() < -1 or ids.max() >= n):
            raise ValueError(f"topk_ids must lie in [-1, {n - 1}] (-1 = skip) for layer {layer}, "
                             f"got [{ids.min()}, {ids.max()}]")
        return L, hidden, ids.astype(np.int64), wts

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, threads=self.threads)

    def paths(self) -> dict:
        """{layer: "int4-int8" | "avx512" | "avx2" | "plain"}: the kernels each layer runs."""
        return {i: L.path for i, L in self._layers.items()}

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        if self._own_pool:
            self._pool.close()

    # -- the forward ------------------------------------------------------------------------------
    def _forward(self, L: ExpertLayer, x: np.ndarray, ids: np.ndarray, wts: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        T, k = ids.shape
        H = L.store.spec.hidden
        out = np.zeros((T, H), dtype=np.float32)
        flat = ids.reshape(-1)
        keep = np.nonzero(flat >= 0)[0]
        order = keep[np.argsort(flat[keep], kind="stable")]
        e_sorted = flat[order]
        tok, w = (order // k).astype(np.int64), wts.reshape(-1)[order]
        experts, starts, counts = np.unique(e_sorted, return_index=True, return_counts=True)
        tile = np.zeros(experts.size, bool)
        if L.path != "plain":                      # every group, decode or prefill, through the IR kernels
            grp_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            if experts.size:
                run_fast(self._pool, L, experts.astype(np.int64), grp_ptr, tok, w, x, out)
        else:
            tile = counts >= self.tile_min_tokens
            for e, s, c in zip(experts[tile], starts[tile], counts[tile]):
                run_tile(self._pool, L, int(e), x, tok[s:s + c], w[s:s + c], out)
            if (~tile).any():
                sel = np.concatenate([np.arange(s, s + c) for s, c in zip(starts[~tile], counts[~tile])])
                grp_e = experts[~tile].astype(np.int64)
                grp_ptr = np.concatenate([[0], np.cumsum(counts[~tile])]).astype(np.int64)
                run_rows(self._pool, L, grp_e, grp_ptr, tok[sel], w[sel], x, out)
        with self._lock:
            st = self._stats
            st["calls"] += 1
            st["tokens"] += T
            st["activations"] += int(keep.size)
            st["skipped"] += int(flat.size - keep.size)
            st["experts_read"] += int(experts.size)
            st["bytes_read"] += int(experts.size) * L.store.expert_nbytes()
            st["tile_experts"] += int(tile.sum())
            st["seconds"] += time.perf_counter() - t0
        return out
