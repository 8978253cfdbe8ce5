"""Kernel benchmark: memory read bandwidth, then decode-style and prefill MoE calls per format.

    python -m bench.kernels [--pool-gib 4] [--threads N] [--formats int4,fp8,bf16] [--calls 40]
                            [--cpu-kernels all|avx512|avx2|plain]

E = experts in the pool, H = 7168, I = 2048 (Kimi K2's routed expert), top-8 per token.
1. Read limit: numpy sum over a large array (one thread), and a Numba read loop with the same thread
   count as the kernels, plain and with software prefetch (docs/kernels.md: the real ceiling).
2. Decode: per format, a pool of experts far larger than the last-level cache, swept once so every
   page is touched, then calls of 1 token with 8 random distinct experts; effective bandwidth =
   bytes of the 8 experts / time, printed as % of the prefetching read loop.
3. Prefill: 256 tokens routed top-8 over the first 64 experts of the pool, one call, vs the same
   routing as 256 one-token decode calls; tokens/s and GFLOP/s (2 * 3 * H * I per activation).
Decode and prefill run once per instruction set of the CPU kernels (cpu_experts.paths): every one the
CPU runs (--cpu-kernels all, the default; plain only when nothing else runs) or the one named.
Weights are random bytes with valid scales: speed does not depend on the values.
Bandwidth drifts about +-10 % between runs (docs/kernels.md), so compare figures from one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import gguf
import numpy as np

from cpu_experts import CpuMoE
from cpu_experts.measure import GIB, H, I, TOPK, decode_bw, prefill, random_store, read_bandwidth
from cpu_experts.moe import physical_cores
from cpu_experts import ir
from cpu_experts.paths import CPU_KERNELS, active_isa, set_cpu_kernels
from quant.formats import get_format
from quant.layout import make_layout


# -- llama.cpp's ggml on the same shapes (when llama-cpp-python is installed) ---------------------------
def ggml_type_id(fmt: str) -> int:
    """The ggml type number of the closest llama.cpp type to `fmt` (Format.ggml_type: Q4_0 = 2, ...)."""
    return int(gguf.GGMLQuantizationType[get_format(fmt).ggml_type])


def _ggml_libs():
    import ctypes
    import pathlib
    import llama_cpp
    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    base, cpu = ctypes.CDLL(str(libdir / "libggml-base.so")), ctypes.CDLL(str(libdir / "libggml-cpu.so"))
    vp, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int

    class Params(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", vp), ("no_alloc", ctypes.c_bool)]
    sigs = {"ggml_init": (vp, [Params]), "ggml_new_tensor_3d": (vp, [vp, c_int, i64, i64, i64]),
            "ggml_new_tensor_2d": (vp, [vp, c_int, i64, i64]), "ggml_get_data": (vp, [vp]),
            "ggml_nbytes": (ctypes.c_size_t, [vp]), "ggml_type_size": (ctypes.c_size_t, [c_int]),
            "ggml_blck_size": (i64, [c_int]), "ggml_mul_mat_id": (vp, [vp, vp, vp, vp]),
            "ggml_mul": (vp, [vp, vp, vp]), "ggml_silu": (vp, [vp, vp]), "ggml_new_graph": (vp, [vp]),
            "ggml_build_forward_expand": (None, [vp, vp]), "ggml_free": (None, [vp])}
    for name, (res, args) in sigs.items():
        fn = getattr(base, name)
        fn.restype, fn.argtypes = res, args
    cpu.ggml_graph_compute_with_ctx.restype = c_int
    cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, c_int]
    cpu.ggml_cpu_init()
    return base, cpu, Params


def ggml_decode(fmt: str, n_experts: int, threads: int, calls: int, rng) -> tuple[float, float]:
    """llama.cpp's own MoE decode ops (ggml_mul_mat_id x3, silu, mul; as llama.cpp builds its MoE FFN)
    on a pool of K2-shaped experts in the closest ggml type; (best GB/s, ms per call)."""
    import ctypes
    base, cpu, Params = _ggml_libs()
    qtype = ggml_type_id(fmt)
    bpw = base.ggml_type_size(qtype) / base.ggml_blck_size(qtype)
    ctx = base.ggml_init(Params(int(3 * n_experts * H * I * bpw) + (256 << 20), None, False))
    if not ctx:
        raise MemoryError("ggml_init could not allocate the expert pool")
    try:
        mats = [base.ggml_new_tensor_3d(ctx, qtype, H, I, n_experts), base.ggml_new_tensor_3d(ctx, qtype, H, I, n_experts),
                base.ggml_new_tensor_3d(ctx, qtype, I, H, n_experts)]
        for t in mats:                                   # unique random bytes on every page, sane scales
            n = base.ggml_nbytes(t)
            arr = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(base.ggml_get_data(t)))
            for o in range(0, n, 64 << 20):
                m = min(64 << 20, n - o)
                arr[o:o + m] = np.frombuffer(rng.bytes(m), np.uint8)
            if qtype in (2, 8):
                arr.reshape(-1, base.ggml_type_size(qtype))[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            else:
                v = arr.view(np.uint16)
                v &= np.uint16(0x807F)
                v |= np.uint16(0x3C00)

        def host(t, ctype, n):
            return np.ctypeslib.as_array((ctype * n).from_address(base.ggml_get_data(t)))
        x, ids, w = (base.ggml_new_tensor_3d(ctx, 0, H, 1, 1), base.ggml_new_tensor_2d(ctx, 26, TOPK, 1),
                     base.ggml_new_tensor_3d(ctx, 0, 1, TOPK, 1))
        host(x, ctypes.c_float, H)[:] = rng.standard_normal(H)
        host(w, ctypes.c_float, TOPK)[:] = 1.0 / TOPK
        id_arr = host(ids, ctypes.c_int32, TOPK)
        g = base.ggml_mul_mat_id(ctx, mats[0], x, ids)
        u = base.ggml_mul_mat_id(ctx, mats[1], x, ids)
        d = base.ggml_mul_mat_id(ctx, mats[2], base.ggml_mul(ctx, base.ggml_silu(ctx, g), u), ids)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, base.ggml_mul(ctx, d, w))
        id_arr[:] = np.arange(TOPK)
        cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
        best = float("inf")
        for _ in range(3):
            sel = [rng.choice(n_experts, TOPK, replace=False) for _ in range(calls)]
            t = time.perf_counter()
            for s in sel:
                id_arr[:] = s
                cpu.ggml_graph_compute_with_ctx(ctx, graph, threads)
            best = min(best, (time.perf_counter() - t) / calls)
    finally:
        base.ggml_free(ctx)
    return TOPK * 3 * H * I * bpw / best / 1e9, best


def _decode_and_prefill(a, store, threads: int, bw: dict, rng) -> tuple[float, float]:
    """Decode (and prefill unless --no-prefill) of one store on the active ISA's kernels, printed against the
    prefetching read loop over the same pool measured just before and after; (that limit, s per decode call)."""
    fmt, n = store.spec.fmt, store.n_experts
    moe = CpuMoE({0: store}, threads=threads)
    moe(0, np.zeros((1, H), np.float32), np.arange(TOPK)[None], np.ones((1, TOPK), np.float32))
    before = read_bandwidth(store.buffer, threads, False)      # also sweeps the pool once
    bwf, dt = decode_bw(moe, store, a.calls, rng)
    after = read_bandwidth(store.buffer, threads, False)
    lim = [max(v for k, v in r.items() if "prefetch" in k) for r in (before, after)]
    limit = sum(lim) / 2
    print(f"decode {fmt:5s} E={n:4d} ({store.buffer.nbytes / GIB:.1f} GiB) path={moe.paths()[0]:9s} "
          f"isa={active_isa():6s} {dt * 1e3:7.2f} ms/call {bwf:6.1f} GB/s = {100 * bwf / limit:5.1f} % of the "
          f"prefetching read loop on this pool ({lim[0]:.1f} before, {lim[1]:.1f} after), "
          f"{100 * bwf / bw['numpy sum, 1 thread']:5.1f} % of numpy sum")
    if a.baseline:
        plain = CpuMoE({0: store}, threads=threads, kernels="plain")
        bwp, dtp = decode_bw(plain, store, max(3, a.calls // 8), rng)
        print(f"decode {fmt:5s} plain-Numba baseline            {dtp * 1e3:7.2f} ms/call {bwp:6.1f} GB/s = "
              f"{100 * bwp / limit:5.1f} %")
        plain.close()
    if not a.no_prefill:
        r = prefill(moe, store, rng)
        print(f"prefill {fmt:5s} isa={active_isa():6s} 256 tokens: {r['prefill tok/s']:7.1f} tok/s "
              f"{r['prefill GFLOP/s']:6.1f} GFLOP/s; decode path {r['decode-path tok/s']:6.1f} tok/s; "
              f"prefill/decode = {r['speedup']:.2f}x")
    moe.close()
    return limit, dt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool-gib", type=float, default=4.0, help="size of each format's expert pool (GiB)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: physical cores)")
    p.add_argument("--formats", default="int4,fp8,bf16")
    p.add_argument("--calls", type=int, default=40, help="timed decode calls per format")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--baseline", action="store_true", help="also time the plain-Numba kernels (slow)")
    p.add_argument("--cpu-kernels", default="all", choices=("all", *CPU_KERNELS[1:]),
                   help="instruction set(s) of the kernels to time (all: every one this CPU runs)")
    a = p.parse_args(argv)
    threads = a.threads or physical_cores()
    rng = np.random.default_rng(0)
    print(f"# threads={threads}  pool={a.pool_gib} GiB per format  shape H={H} I={I} top-{TOPK}  "
          f"load average at start {os.getloadavg()[0]:.2f} (the host is shared; figures are best of rounds)")
    buf = np.ones(int(max(a.pool_gib, 1.0) * GIB), np.uint8)
    bw = read_bandwidth(buf, threads)
    bw.update({k.replace(f"{threads} thr", "1 thr"): v for k, v in read_bandwidth(buf, 1, False).items()})
    del buf
    for k, v in bw.items():
        print(f"read bandwidth  {k:<40s} {v:6.1f} GB/s")
    try:
        __import__("llama_cpp")
        have_llama = True
    except ImportError:
        have_llama = False
    isas = [i for i in ir.ISAS if ir.supported(i)] or ["plain"] if a.cpu_kernels == "all" else [a.cpu_kernels]
    for fmt in a.formats.split(","):
        size = make_layout(fmt, H, I).stride
        n = max(TOPK, int(a.pool_gib * GIB // size))
        store = random_store(fmt, n, rng)
        dt = None
        for isa in isas:
            set_cpu_kernels(isa)
            limit, dt = _decode_and_prefill(a, store, threads, bw, rng)
        del store
        if have_llama:
            try:
                gbw, gdt = ggml_decode(fmt, n, threads, a.calls, rng)
                print(f"decode {fmt:5s} llama.cpp ggml {get_format(fmt).ggml_type:5s} (same shapes, E={n}, {threads} "
                      f"thr) {gdt * 1e3:7.2f} ms/call {gbw:6.1f} GB/s = {100 * gbw / limit:5.1f} %; ours ({isas[-1]})/"
                      f"ggml time = {dt / gdt:.2f}")
            except (OSError, AttributeError, MemoryError) as exc:
                print(f"decode {fmt:5s} llama.cpp ggml: failed ({exc}), skipped")
    if not have_llama:
        print("llama-cpp-python: not installed, llama.cpp comparison skipped")
    try:
        __import__("kt_kernel")
        print("kt_kernel: installed, but its CPU MoE operator is not wired into this benchmark (skipped)")
    except ImportError:
        print("kt_kernel: not installed, skipped")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
