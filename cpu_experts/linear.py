"""PackedLinear and PackedMLP: dense layers (attention projections, shared expert, dense MLP, lm_head) on
the expert kernels, their weights kept in int4, fp8 or bf16 (quant/packed.py).

T = tokens, G = groups, N = output rows, K = inputs, H = hidden, I = inter.

    PackedLinear(w: PackedMatrix [G, N, K]).run(x, out, pool) -> out
        G == 1: x [T, K] -> out [T, N] = x @ W^T
        G > 1:  x [T, G, K] -> out [T, G, N], out[t, g] = W[g] @ x[t, g]   (MLA's absorbed kv_b, per head)
    PackedMLP(gate, up, down).run(x [T, H], out [T, H], pool) -> out = down(silu(gate x) * up x)

x is float32 (converted if not); out is float32, C-contiguous, allocated by the caller (reused across
calls), overwritten. The call is synchronous: it returns when out is complete. The caller passes the
RowPool, so the dense layers and the routed experts share one pool of threads. One instance keeps
per-call buffers: call it from one thread at a time.

How: a PackedMatrix lays each group out as one expert's down matrix (quant/packed.py), so a product is the
experts' `down` driver with the groups as experts and the pairs p = g * T + t (weights 1, out zeroed
first): the same IR kernels read each weight row block once for all T tokens (prefill) and reach the
experts' bandwidth at T = 1 (decode). A dense MLP is a one-expert LayerStore run by cpu_experts/experts.py:
two pool calls (gate/up with SiLU, then down). The path (cpu_experts/paths.py): "int4-int8", "avx512", "avx2" or
"plain", which the `path` attribute tells; a shape the fast kernels cannot take runs plain.
"""
from __future__ import annotations

import numpy as np

from quant.layout import make_layout
from quant.packed import PackedMatrix
from quant.store import LayerStore, StoreSpec

from cpu_experts import fp8_avx512, int4_vnni, ir
from cpu_experts.experts import TILE_ROWS, ExpertLayer, int8_buffers, run_fast, run_rows, run_tile, warm_up
from cpu_experts.jit import PREFETCH_BYTES
from cpu_experts.paths import KERNELS, choose_path, isa_index
from cpu_experts.pool import RowPool

SERIAL_BYTES = 256 << 10     # a product reading fewer weight bytes runs on the calling thread alone: a
#                              hand-off costs 7.6-15 us (pool.py), what one thread needs for 150-300 KB at 20 GB/s
ROW_ALIGN = 16               # thread row ranges start on 16 rows: 64 bytes of float32 output per token
SCRATCH_TOKENS = 16          # per-call buffers are kept for calls of up to this many tokens (decode)
TILE_MIN_TOKENS = 4          # the plain path dequantizes tiles for a BLAS GEMM from this many tokens on


class _Scratch:
    """Index arrays and activation buffers of a call with T tokens (kept for small T)."""

    def __init__(self, head: tuple, G: int, T: int, K: int, path: str, reorder: bool):
        P = G * T
        p = np.arange(P, dtype=np.int64)
        # the driver's arguments up to the activations: weights, groups (= experts), pair p = g * T + t writing
        # output row t * G + g, weights 1
        self.args = (*head, np.arange(G, dtype=np.int64), np.arange(G + 1, dtype=np.int64) * T,
                     (p % T) * G + p // T, np.ones(P, np.float32))
        self.xp = np.empty((P, K), np.float32) if G > 1 and T > 1 else None   # activations in pair order
        self.xo = np.empty((P, K), np.float32) if reorder else None             # in the fp8 kernel's order
        self.q = int8_buffers(P, K) if path == "int4-int8" else None


class PackedLinear:
    def __init__(self, w: PackedMatrix, activations: str = "auto", kernels: str = "auto"):
        """w: the weight; activations / kernels as in CpuMoE (int4: "auto" = int8 activations on VNNI, about
        1e-2 of max|y| from exact; "float" = exact, plain kernels)."""
        self.w = w
        self.path = choose_path(w.fmt, (w.cols,), activations, kernels)
        k = KERNELS[w.fmt]
        self._mod = k.plain if self.path == "plain" else k.fast
        buf = np.asarray(w.buffer)
        lay = np.array([0, 0, 0, 0, 0, w.scale_offset], np.int64)       # codes as "down", scales as "down_scale"
        self._head = (buf, buf.view(np.uint16), buf.view(np.float32), np.int64(w.stride), lay,
                      np.int64(w.rows), np.int64(w.cols), np.int64(w.group_size))
        self._order = ir.fp8_order(w.cols) if w.fmt == "fp8" and self.path in ir.ISAS else None
        self._isa = np.int64(isa_index(self.path)) if self.path != "plain" else None
        self._pfd = np.int64(PREFETCH_BYTES[w.fmt])
        self._parts = 1 if w.nbytes < SERIAL_BYTES else None
        self._scratch: dict[int, _Scratch] = {}
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile (or load from Numba's cache) this path's kernels for these buffer types: a call on an empty
        row range reads no weights."""
        G, K = self.w.groups, self.w.cols
        self.run(np.zeros((1, K) if G == 1 else (1, G, K), np.float32),
                 np.zeros((1, self.w.rows) if G == 1 else (1, G, self.w.rows), np.float32), RowPool(1), rows=0)
        if self.path == "plain":
            self._mod.dequant_rows(*self._head, 0, 2, 0, 0, 0, np.zeros((1, K), np.float32))

    def run(self, x: np.ndarray, out: np.ndarray, pool: RowPool, rows: int | None = None) -> np.ndarray:
        """out = x @ W^T (per group); returns out. rows: compute only rows [0, rows) (warm-up; None: all)."""
        G, N, K = self.w.groups, self.w.rows, self.w.cols
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        T = x.shape[0]
        if x.shape != ((T, K) if G == 1 else (T, G, K)):
            raise ValueError(f"x has shape {x.shape}; this linear takes [T, {K}]" if G == 1 else
                             f"x has shape {x.shape}; this grouped linear takes [T, {G}, {K}]")
        if out.shape != ((T, N) if G == 1 else (T, G, N)) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out is {out.dtype} {out.shape}; pass a C-contiguous float32 array of shape "
                             f"{(T, N) if G == 1 else (T, G, N)}")
        out[...] = 0
        if T == 0:
            return out
        s = self._scratch.get(T)
        if s is None:
            s = _Scratch(self._head, G, T, K, self.path, self._order is not None)
            if T <= SCRATCH_TOKENS:
                self._scratch[T] = s
        xp = x if G == 1 else x.reshape(G, K) if T == 1 else _pairs(x, s.xp)
        o2 = out if G == 1 else out.reshape(T * G, N)
        n = N if rows is None else rows
        if self.path == "int4-int8":
            int4_vnni.prepare_int8(xp, *s.q)
            args = (*s.args, *s.q, self._isa, self._pfd, o2)
        elif self.path in ir.ISAS:
            if self._order is not None:
                fp8_avx512.in_kernel_order(xp, self._order, s.xo)
                xp = s.xo
            args = (*s.args, xp, self._isa, self._pfd, o2)
        elif T >= TILE_MIN_TOKENS:
            self._tiles(xp, out.reshape(T, G, N), pool, n)
            return out
        else:
            args = (*s.args, xp, o2)
        pool.run(self._mod.down, args, n, align=ROW_ALIGN, parts=self._parts)
        return out

    def _tiles(self, xp: np.ndarray, out3: np.ndarray, pool: RowPool, n: int) -> None:
        """Plain path, many tokens: the pool dequantizes TILE_ROWS rows to float32, one BLAS GEMM uses them."""
        T, G = out3.shape[0], out3.shape[1]
        tile = np.empty((TILE_ROWS, self.w.cols), np.float32)
        for g in range(G):
            for h0 in range(0, n, TILE_ROWS):
                m = min(TILE_ROWS, n - h0)
                pool.run(self._mod.dequant_rows, (*self._head, g, 2, h0, tile), m, start=h0, parts=self._parts)
                out3[:, g, h0:h0 + m] = xp[g * T:(g + 1) * T] @ tile[:m].T


def _pairs(x: np.ndarray, buf: np.ndarray | None) -> np.ndarray:
    """x [T, G, K] -> [G * T, K] in pair order (row g * T + t = x[t, g])."""
    T, G, K = x.shape
    dst = np.empty((G * T, K), np.float32) if buf is None else buf
    dst.reshape(G, T, K)[...] = x.transpose(1, 0, 2)
    return dst


class PackedMLP:
    def __init__(self, gate: PackedMatrix, up: PackedMatrix, down: PackedMatrix, activations: str = "auto",
                 kernels: str = "auto"):
        """gate, up [I, H] and down [H, I], one group each, all in one format (quant.dense.DenseReader.mlp
        gives them so)."""
        I, H = gate.rows, gate.cols
        shapes = [(m.fmt, m.groups, m.rows, m.cols, m.group_size) for m in (gate, up, down)]
        if shapes != [(gate.fmt, 1, I, H, gate.group_size)] * 2 + [(gate.fmt, 1, H, I, gate.group_size)]:
            raise ValueError(f"a dense MLP needs gate/up [I, H] and down [H, I] in one format and group size; "
                             f"got (fmt, groups, rows, cols, group) = {shapes}")
        spec = StoreSpec(gate.fmt, H, I, gate.group_size)
        store = LayerStore(spec, 1, np.zeros(make_layout(spec.fmt, H, I, spec.group_size).stride, np.uint8),
                           source="dense MLP")
        for name, m in (("gate", gate), ("up", up), ("down", down)):
            store.section(0, name)[...] = m.codes()
            if m.scales() is not None:
                store.section(0, name + "_scale")[...] = m.scales()
        self.fmt, self.hidden, self.inter = gate.fmt, H, I
        self.path = choose_path(gate.fmt, (H, I), activations, kernels)
        self._layer = ExpertLayer(store, self.path)
        self._index: dict[int, tuple] = {}
        self._parts = 1 if self.nbytes < SERIAL_BYTES else None
        warm_up(RowPool(1), self._layer)

    @property
    def nbytes(self) -> int:
        """Weight bytes one call reads."""
        return self._layer.store.expert_nbytes()

    def run(self, x: np.ndarray, out: np.ndarray, pool: RowPool) -> np.ndarray:
        """out = down(silu(gate x) * up x); x [T, H] float32, out [T, H] float32 C-contiguous; returns out."""
        H = self.hidden
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != H:
            raise ValueError(f"x has shape {x.shape}; this MLP takes [T, {H}]")
        T = x.shape[0]
        if out.shape != (T, H) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out is {out.dtype} {out.shape}; pass a C-contiguous float32 array of shape {(T, H)}")
        out[...] = 0
        if T == 0:
            return out
        idx = self._index.get(T) or (np.zeros(1, np.int64), np.array([0, T], np.int64), np.arange(T, dtype=np.int64),
                                     np.ones(T, np.float32))
        if T <= SCRATCH_TOKENS:
            self._index[T] = idx
        grp_e, grp_ptr, tok, w = idx
        if self.path != "plain":
            run_fast(pool, self._layer, grp_e, grp_ptr, tok, w, x, out, self._parts)
        elif T >= TILE_MIN_TOKENS:
            run_tile(pool, self._layer, 0, x, tok, w, out)
        else:
            run_rows(pool, self._layer, grp_e, grp_ptr, tok, w, x, out, self._parts)
        return out
