"""CpuMoE: the CPU forward of routed experts, in two steps (submit, then wait).

T = tokens, k = experts per token, P = (token, expert) pairs, H = hidden, I = inter.

    submit(layer, hidden [T, H], topk_ids [T, k], topk_weights [T, k]) -> Ticket   (returns at once)
    wait(ticket) -> out [T, H] f32 = sum_j w[t, j] * Expert_{ids[t, j]}(hidden[t]);  ids of -1 skipped

One background thread takes submitted calls in order; it groups the pairs by expert and drives a
RowPool of `threads` threads (itself included) through nogil Numba kernels. Every thread takes a
contiguous range of rows of *every* selected expert (rows x experts), gate/up first, then a barrier,
then down. Which kernels run depends on the layer (paths()):
  - "int4-int8" / "avx512" (AVX-512 CPUs): the IR kernels of cpu_experts/ir.py, for decode and
    prefill alike: a block of ROW_BLOCK weight rows is decoded in registers for up to 4 tokens at a
    time and serves every token of its expert's group while it sits in L2, so a call reads each
    selected expert's weights once, whatever the number of tokens;
  - "plain" (portable fallback): per-pair Numba kernels for experts chosen by few tokens, and for an
    expert chosen by >= tile_min_tokens tokens a "tile" path: the pool dequantizes a tile of rows to
    float32 once and one float32 GEMM (numpy's BLAS) applies it to all those tokens.
The caller must not modify `hidden` until wait() returned.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cpu_experts import bf16 as k_bf16, fp8 as k_fp8, int4 as k_int4
from cpu_experts import bf16_avx512, fp8_avx512, int4_vnni, ir
from cpu_experts.jit import PREFETCH_BYTES
from cpu_experts.pool import RowPool
from quant.store import LayerStore

_KERNELS = {"int4": k_int4, "fp8": k_fp8, "bf16": k_bf16}
TILE_ROWS = 256          # rows per dequantized tile: 256 x 7168 f32 = 7.3 MB, stays in the 32 MB L3
TILE_MIN_TOKENS = 4      # an expert chosen by at least this many tokens of a call takes the tile path


def physical_cores() -> int:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return int(n or os.cpu_count() or 1)


def _int8_buffers(rows: int, n: int):
    return (np.empty((rows, n), np.int8), np.empty((rows, n // 128), np.float32),
            np.empty((rows, n // 8), np.int32))


@dataclass
class Ticket:
    layer: int
    future: Future


def choose_path(fmt: str, hidden: int, inter: int, activations: str = "auto", kernels: str = "auto") -> str:
    """Which kernels a layer runs: "int4-int8" (VNNI), "avx512" (fp8/bf16 IR kernels) or "plain" (Numba).

    "auto" takes the fast path when the CPU has what ir.REQUIRED lists and the shapes fit it, else plain.
    """
    if activations not in ("auto", "float", "int8") or kernels not in ("auto", "plain"):
        raise ValueError(f"activations={activations!r} (use 'auto', 'float' or 'int8'), kernels={kernels!r} "
                         "(use 'auto' or 'plain')")
    unit = {"int4": 128, "fp8": 64, "bf16": 32}[fmt]
    fits = kernels == "auto" and ir.supported() and hidden % unit == 0 and inter % unit == 0
    if activations == "int8" and (fmt != "int4" or not fits):
        raise ValueError(f"activations='int8' needs int4 experts, an AVX-512 VNNI CPU ({', '.join(ir.REQUIRED)}) "
                         f"and hidden/inter multiples of 128; got fmt={fmt}, shape {hidden}/{inter}, "
                         f"cpu ok={ir.supported()}; use activations='auto' or 'float'")
    if fmt == "int4":
        return "int4-int8" if fits and activations != "float" else "plain"
    return "avx512" if fits else "plain"


class _Layer:
    """A store plus the typed views of its buffer that the kernels take."""

    def __init__(self, store: LayerStore, path: str = "plain"):
        s = store.spec
        self.store, self.mod, self.path = store, _KERNELS[s.fmt], path
        self.fast = {"int4-int8": int4_vnni, "avx512": fp8_avx512 if s.fmt == "fp8" else bf16_avx512}.get(path)
        self.order = ir.fp8_order(s.hidden) if s.fmt == "fp8" and path == "avx512" else None
        buf = np.asarray(store.buffer)            # drop the np.memmap subclass (no copy)
        self.buf8, self.buf16, self.buf32 = buf, buf.view(np.uint16), buf.view(np.float32)
        names = ("gate", "up", "down", "gate_scale", "up_scale", "down_scale")
        secs = store.layout.sections
        self.lay = np.array([secs[n].offset if n in secs else 0 for n in names], dtype=np.int64)
        self.head = (self.buf8, self.buf16, self.buf32, np.int64(store.stride), self.lay,
                     np.int64(s.hidden), np.int64(s.inter), np.int64(s.group_size))


class CpuMoE:
    def __init__(self, stores: dict, threads: int | None = None, activations: str = "auto",
                 tile_min_tokens: int = TILE_MIN_TOKENS, kernels: str = "auto"):
        """stores: {layer index: LayerStore}. threads: None -> physical cores.

        activations (int4 only): "auto" = int8 activations with VNNI when the CPU has it (default; about
        1e-2 of max|y| from exact on random data, bounded at 4e-2 in the tests), "float" = float32
        activations (exact up to f32 rounding, plain Numba kernels, slow), "int8" = require the VNNI path. kernels: "auto" = AVX-512 IR kernels when available, "plain" = the
        portable Numba kernels only. paths() tells what each layer runs.
        """
        self.threads = physical_cores() if threads is None else int(threads)
        self.tile_min_tokens = int(tile_min_tokens)
        self._pool = RowPool(self.threads)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="cpu_moe")
        self._layers = {int(i): _Layer(s, choose_path(s.spec.fmt, s.spec.hidden, s.spec.inter, activations, kernels))
                        for i, s in stores.items()}
        self._lock = threading.Lock()
        self._stats = dict(calls=0, tokens=0, activations=0, skipped=0, experts_read=0, bytes_read=0,
                           tile_experts=0, seconds=0.0)
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile (or load from Numba's cache) every kernel for every layer's buffer types, now."""
        seen = set()
        for L in self._layers.values():
            key = (L.store.spec.fmt, L.path, L.buf8.flags.writeable)
            if key in seen:
                continue
            seen.add(key)
            H, I = L.store.spec.hidden, L.store.spec.inter
            z = np.zeros(0, dtype=np.int64)
            ptr = np.zeros(1, dtype=np.int64)
            if L.fast is not None:                   # one real call compiles every token-block size
                x = np.zeros((1, H), np.float32)
                self._fast(L, np.zeros(1, np.int64), np.array([0, 7], np.int64), np.zeros(7, np.int64),
                           np.zeros(7, np.float32), x, np.zeros((1, H), np.float32))
                continue
            L.mod.gateup(*L.head, z, ptr, z, np.zeros((1, H), np.float32), 0, 0, np.zeros((0, I), np.float32))
            L.mod.down(*L.head, z, ptr, z, np.zeros(0, np.float32), np.zeros((0, I), np.float32), 0, 0,
                       np.zeros((1, H), np.float32))
            L.mod.dequant_rows(*L.head, 0, 0, 0, 0, 0, np.zeros((1, H), np.float32))

    # -- public API -------------------------------------------------------------------------------
    def submit(self, layer: int, hidden: np.ndarray, topk_ids: np.ndarray, topk_weights: np.ndarray) -> Ticket:
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
        return Ticket(int(layer), self._worker.submit(self._forward, L, hidden, ids.astype(np.int64), wts))

    def wait(self, ticket: Ticket) -> np.ndarray:
        return ticket.future.result()

    def __call__(self, layer, hidden, ids, weights) -> np.ndarray:
        return self.wait(self.submit(layer, hidden, ids, weights))

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, threads=self.threads)

    def paths(self) -> dict:
        """{layer: "int4-int8" | "avx512" | "plain"}: the kernels each layer runs."""
        return {i: L.path for i, L in self._layers.items()}

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self._pool.close()

    # -- the forward ------------------------------------------------------------------------------
    def _forward(self, L: _Layer, x: np.ndarray, ids: np.ndarray, wts: np.ndarray) -> np.ndarray:
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
                self._fast(L, experts.astype(np.int64), grp_ptr, tok, w, x, out)
        else:
            tile = counts >= self.tile_min_tokens
            for e, s, c in zip(experts[tile], starts[tile], counts[tile]):
                self._tile_expert(L, int(e), x, tok[s:s + c], w[s:s + c], out)
            if (~tile).any():
                sel = np.concatenate([np.arange(s, s + c) for s, c in zip(starts[~tile], counts[~tile])])
                grp_e = experts[~tile].astype(np.int64)
                grp_ptr = np.concatenate([[0], np.cumsum(counts[~tile])]).astype(np.int64)
                self._rows(L, grp_e, grp_ptr, tok[sel], w[sel], x, out)
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

    def _rows(self, L, grp_e, grp_ptr, tok, w, x, out) -> None:
        """Plain Numba kernels: tokens read through `tok`, one pass over the weights per pair."""
        H, I = L.store.spec.hidden, L.store.spec.inter
        act = np.empty((tok.size, I), dtype=np.float32)
        self._pool.run(L.mod.gateup, (*L.head, grp_e, grp_ptr, tok, x, act), I)
        self._pool.run(L.mod.down, (*L.head, grp_e, grp_ptr, tok, w, act, out), H)

    def _fast(self, L, grp_e, grp_ptr, tok, w, x, out) -> None:
        """IR kernels: activations gathered in pair order; each weight row block serves its whole group."""
        H, I = L.store.spec.hidden, L.store.spec.inter
        act = np.empty((tok.size, I), dtype=np.float32)
        pfd = np.int64(PREFETCH_BYTES[L.store.spec.fmt])
        if L.path == "avx512":
            if L.store.spec.fmt == "fp8":         # the fp8 kernel reads activations in its own order
                x = x[:, L.order]
            self._pool.run(L.fast.gateup, (*L.head, grp_e, grp_ptr, x[tok], pfd, act), I, align=128)
            self._pool.run(L.fast.down, (*L.head, grp_e, grp_ptr, tok, w, act, pfd, out), H, align=128)
            return
        xq, xs, xc = _int8_buffers(x.shape[0], H)           # quantize each token once, then gather
        int4_vnni.prepare_int8(x, xq, xs, xc)
        xq, xs, xc = xq[tok], xs[tok], xc[tok]
        self._pool.run(int4_vnni.gateup, (*L.head, grp_e, grp_ptr, xq, xs, xc, pfd, act), I, align=128)
        aq, as_, ac = _int8_buffers(tok.size, I)
        int4_vnni.prepare_int8(act, aq, as_, ac)
        self._pool.run(int4_vnni.down, (*L.head, grp_e, grp_ptr, tok, w, aq, as_, ac, pfd, out), H, align=128)

    def _tile_expert(self, L, e, x, tok, w, out) -> None:
        H, I = L.store.spec.hidden, L.store.spec.inter
        X = x[tok]
        unique = np.unique(tok).size == tok.size
        act = np.empty((tok.size, I), dtype=np.float32)
        tg = np.empty((TILE_ROWS, H), dtype=np.float32)
        tu = np.empty((TILE_ROWS, H), dtype=np.float32)
        for r0 in range(0, I, TILE_ROWS):
            n = min(TILE_ROWS, I - r0)
            self._pool.run(L.mod.dequant_rows, (*L.head, e, 0, r0, tg), n, start=r0)
            self._pool.run(L.mod.dequant_rows, (*L.head, e, 1, r0, tu), n, start=r0)
            g = X @ tg[:n].T
            with np.errstate(over="ignore"):
                act[:, r0:r0 + n] = g / (np.float32(1.0) + np.exp(-g)) * (X @ tu[:n].T)
        rows_d = TILE_ROWS * max(1, H // I)
        td = np.empty((rows_d, I), dtype=np.float32)
        for h0 in range(0, H, rows_d):
            n = min(rows_d, H - h0)
            self._pool.run(L.mod.dequant_rows, (*L.head, e, 2, h0, td), n, start=h0)
            y = w[:, None] * (act @ td[:n].T)
            if unique:
                out[tok, h0:h0 + n] += y
            else:                                   # a token listed the same expert twice
                np.add.at(out, (tok[:, None], np.arange(h0, h0 + n)[None, :]), y)
