"""Hand-built LLVM IR row kernels (AVX-512, and AVX2 + FMA + F16C), exposed to Numba as @intrinsic calls.

Why IR: Numba types narrow integer code as int64, so LLVM never forms vpdpbusd from Python-level
code, and data-indexed tables become slow gathers (docs/kernels.md: plain Numba stops at ~50 % of the
read limit). Each kernel here computes, for i in [0, n):

    oA[i * ostride] = row(wA + i * wstride) . x         oB[i * ostride] = row(wB + i * wstride) . x

two rows per pass sharing every activation load (the fp8/bf16 kernels read x from xA only; callers
pass xB == xA), for 1, 2 or 4 tokens at once, 64-byte unaligned loads (an
aligned load crashed on numpy buffers, docs/kernels.md), and a software prefetch `pfd` bytes ahead in
each weight stream (the largest single step to the limit: 8-16 KiB ahead).

  int4 (vnni): 64 packed bytes = 128 inputs = 4 blocks of 32. Low nibbles x the "lo" int8
      activations, high nibbles x the "hi" ones, by vpdpbusd (u8 x s8 -> i32, 4 per lane); the
      accumulator starts at corr = -8 * sum(x8) per lane, which removes the +8 nibble offset; then
      float(lane) * bf16 scale of the lane's group * the chunk's activation scale, FMA. Activations
      come from prepare_int8 (cpu_experts/int4_vnni.py): per 128 inputs, x8 = rint(x / s), s = max|x|/127.
  fp8: code -> the exact bf16 bytes of its value by two 128-entry byte-table lookups (vpermi2b, the
      sign OR-ed in), in-lane byte unpacks pair them into bf16 words, and each dword's two words
      become two floats by a shift and a mask: exact for every code, subnormals and NaN included, no
      int->float conversion. This permutes elements inside each 64 (fp8_order); the caller stores the
      activations in that order, pre-multiplied by the block scale. (Measured per thread, L2-resident:
      word unpacks instead of shift/mask 47 GB/s; a half-precision variant, ((b << 8) >> 1) & 0xBFFF
      then vcvtph2ps, 35 GB/s.)
  bf16: bits << 16 reinterpreted as float; FMA.

AVX2 (the same skeleton, data layouts and prefetch; 256-bit vectors, so two per 64-byte chunk):
  int4: vpmaddubsw (u8 nibbles x s8 activations -> i16 pairs) for the low and the high nibbles, added,
      then vpmaddwd by ones (-> i32 per 4-byte lane, the lanes of vpdpbusd) plus the correction.
  fp8: the half-precision bit trick (see _fp8_decode_avx2) and vcvtph2ps; the row sums times 2^8.
  bf16: as AVX-512, 8 floats per vector.

The IR text is linked into each Numba function that uses it (cached with it, cache=True). Callers
must check `supported(isa)` (ISA_FEATURES) before calling, and fall back otherwise.
"""
from __future__ import annotations

import llvmlite.binding as ll
from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

VERSION = 1
PREFETCH_LOCALITY = 3      # llvm.prefetch locality 3 = prefetcht0; t2 (1) measured the same (44.8 vs 45.0 GB/s int4)
# The instruction sets the IR kernels are built for, fastest first, with the CPU features each needs
# (vbmi: vpermi2b; f16c: vcvtph2ps) and its float vector width.
ISA_FEATURES = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vbmi", "fma"),
                "avx2": ("avx2", "fma", "f16c")}
ISAS = tuple(ISA_FEATURES)
WIDTH = {"avx512": 16, "avx2": 8}
REQUIRED = ISA_FEATURES["avx512"]
# Features of the CPUs NUMBA_CPU_NAME may name (Numba then compiles for that CPU, not the host's): the
# AVX2 generation (Haswell .. Zen 3) and the AVX-512 one with VNNI + VBMI (Ice Lake, Sapphire Rapids, Zen 4).
_AVX2_CPUS = ("haswell", "broadwell", "skylake", "znver1", "znver2", "znver3", "alderlake")
_AVX512_CPUS = ("icelake-server", "icelake-client", "sapphirerapids", "znver4", "tigerlake")


def cpu_features() -> frozenset[str]:
    """The CPU features Numba compiles for, as Numba picks them: the host's unless NUMBA_CPU_FEATURES is set
    (Numba keeps the host's features under NUMBA_CPU_NAME alone); when it is, those of NUMBA_CPU_NAME's CPU
    (known names only; none for others) with its "+feat" entries added and "-feat" ones removed. E.g. Zen 2
    (EPYC Rome) on any host: NUMBA_CPU_NAME=znver2 NUMBA_CPU_FEATURES=-avx512f."""
    import os
    spec = os.environ.get("NUMBA_CPU_FEATURES")
    if not spec:
        return frozenset(f for f, on in ll.get_host_cpu_features().items() if on)
    name = os.environ.get("NUMBA_CPU_NAME", "generic")
    base = set(ISA_FEATURES["avx2"]) if name in _AVX2_CPUS + _AVX512_CPUS else set()
    if name in _AVX512_CPUS:
        base |= set(ISA_FEATURES["avx512"])
    for f in spec.split(","):
        if f[:1] in "+-" and f[1:]:
            (base.add if f[0] == "+" else base.discard)(f[1:])
    if "avx512f" not in base:                   # as LLVM: no AVX-512 extension without the foundation
        base = {f for f in base if not f.startswith("avx512")}
    return frozenset(base)


def missing(isa: str) -> tuple[str, ...]:
    """The features `isa` needs that the compile target lacks (empty: it can run)."""
    feats = cpu_features()
    return tuple(f for f in ISA_FEATURES[isa] if f not in feats)


def supported(isa: str = "avx512") -> bool:
    return not missing(isa)


def _vec(ty: str, n: int, v) -> str:
    return "<" + ", ".join(f"{ty} {v}" for _ in range(n)) + ">"


def _mask(idx) -> str:
    return "<" + ", ".join(f"i32 {i}" for i in idx) + ">"


_DECLS = """
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
declare float @llvm.vector.reduce.fadd.v16f32(float, <16 x float>)
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)
declare <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8>, <64 x i8>, <64 x i8>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
"""

# Shared skeleton: row loop -> chunk loop (one 64-byte weight chunk per row per step) -> reduce + store.
# Rows A and B advance together; `nt` tokens (activation rows `tx` elements apart) reuse each decoded
# chunk from registers. Output of row i, token t: o{A,B}[i * ostride + t * otstride], stored, or added
# to when accum != 0 (so a caller can split long rows into column blocks that stay in L1).
_SKELETON = """
define void @{name}({params}, i64 %tx, i64 %wstride, i64 %nch, i64 %n, ptr %oA, ptr %oB, i64 %ostride,
                    i64 %otstride, i64 %pfd, i64 %accum) {{
entry:
  %acc.on = icmp ne i64 %accum, 0
  %has = icmp sgt i64 %n, 0
  br i1 %has, label %row, label %exit
row:
  %r = phi i64 [0, %entry], [%r.next, %rowend]
  %wo = mul i64 %r, %wstride
  %wa = getelementptr i8, ptr %wA, i64 %wo
  %wb = getelementptr i8, ptr %wB, i64 %wo
{row_setup}
  br label %chunk
chunk:
  %c = phi i64 [0, %row], [%c.next, %chunk]
{phis}
  %off = shl i64 %c, 6
  %pa = getelementptr i8, ptr %wa, i64 %off
  %pb = getelementptr i8, ptr %wb, i64 %off
  %pfa = getelementptr i8, ptr %pa, i64 %pfd
  %pfb = getelementptr i8, ptr %pb, i64 %pfd
  call void @llvm.prefetch.p0(ptr %pfa, i32 0, i32 {loc}, i32 1)
  call void @llvm.prefetch.p0(ptr %pfb, i32 0, i32 {loc}, i32 1)
{body}
  %c.next = add i64 %c, 1
  %more = icmp slt i64 %c.next, %nch
  br i1 %more, label %chunk, label %rowend
rowend:
  %oo = mul i64 %r, %ostride
{final}
  %r.next = add i64 %r, 1
  %rmore = icmp slt i64 %r.next, %n
  br i1 %rmore, label %row, label %exit
exit:
  ret void
}}
"""


def _store(s: str, t: int, accs: list, W: int, scale: str = "") -> list:
    """Sum the accumulators (<W x float>) of (row s, token t), reduce, times `scale` if given, store."""
    out, prev = [], accs[0]
    for i, a in enumerate(accs[1:]):
        out.append(f"  %t{s}{t}_{i} = fadd <{W} x float> {prev}, {a}")
        prev = f"%t{s}{t}_{i}"
    red = f"%r{s}{t}" + ("u" if scale else "")
    out += [f"  {red} = call reassoc float @llvm.vector.reduce.fadd.v{W}f32(float 0.0, <{W} x float> {prev})"]
    if scale:
        out.append(f"  %r{s}{t} = fmul float {red}, {scale}")
    out += [
            f"  %ot{s}{t} = mul i64 %otstride, {t}",
            f"  %oi{s}{t} = add i64 %oo, %ot{s}{t}",
            f"  %po{s}{t} = getelementptr float, ptr %o{s}, i64 %oi{s}{t}",
            f"  %old{s}{t} = load float, ptr %po{s}{t}, align 4",       # accum != 0: add to the output
            f"  %sum{s}{t} = fadd float %old{s}{t}, %r{s}{t}",
            f"  %w{s}{t} = select i1 %acc.on, float %sum{s}{t}, float %r{s}{t}",
            f"  store float %w{s}{t}, ptr %po{s}{t}, align 4"]
    return out


def _e4m3_tables() -> tuple[str, str, str, str]:
    """bf16 bits of e4m3 magnitudes 0..127 (exact: <= 4 significant bits), split into high and low bytes,
    as the two 64-byte halves that vpermi2b indexes with the low 7 bits of a code."""
    from quant.fp8 import E4M3_VALUES
    import numpy as np
    b16 = (E4M3_VALUES[:128].view(np.uint32) >> 16).astype(np.int64)
    hi, lo = (b16 >> 8).tolist(), (b16 & 0xFF).tolist()
    vec = lambda xs: "<" + ", ".join(f"i8 {x - 256 if x > 127 else x}" for x in xs) + ">"
    return vec(hi[:64]), vec(hi[64:]), vec(lo[:64]), vec(lo[64:])


def _unpack_masks():
    """Shuffle masks equal to vpunpck{l,h}bw (bytes -> words: low byte from the first operand) inside
    each 128-bit lane, so LLVM emits the single in-lane instructions."""
    lbw, hbw = [], []
    for L in range(4):
        for k in range(8):
            lbw += [16 * L + k, 64 + 16 * L + k]
            hbw += [16 * L + 8 + k, 64 + 16 * L + 8 + k]
    return _mask(lbw), _mask(hbw)


def fp8_order(n: int):
    """Activation order the fp8 kernel expects: position 64c + 16q + 4L + m holds input
    64c + 16L + 8(q // 2) + 2m + q % 2 (what the in-lane unpacks and the word split produce)."""
    import numpy as np
    c, q, L, m = np.meshgrid(np.arange(n // 64), np.arange(4), np.arange(4), np.arange(4), indexing="ij")
    return (64 * c + 16 * L + 8 * (q // 2) + 2 * m + q % 2).reshape(-1)


def _fp8_decode_avx512(s: str, p: str) -> list:
    """64 fp8 codes at %{p} -> %f{s}0..3 <16 x float> (exact values, in fp8_order)."""
    tha, thb, tla, tlb = _e4m3_tables()
    lbw, hbw = _unpack_masks()
    body = [f"  %v{s} = load <64 x i8>, ptr %{p}, align 1",
            f"  %hi{s}0 = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> {tha}, <64 x i8> %v{s}, "
            f"<64 x i8> {thb})",
            f"  %sg{s} = and <64 x i8> %v{s}, {_vec('i8', 64, -128)}",
            f"  %hi{s} = or <64 x i8> %hi{s}0, %sg{s}",
            f"  %lo{s} = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> {tla}, <64 x i8> %v{s}, "
            f"<64 x i8> {tlb})",
            f"  %wl{s}8 = shufflevector <64 x i8> %lo{s}, <64 x i8> %hi{s}, <64 x i32> {lbw}",
            f"  %wh{s}8 = shufflevector <64 x i8> %lo{s}, <64 x i8> %hi{s}, <64 x i32> {hbw}",
            f"  %wl{s} = bitcast <64 x i8> %wl{s}8 to <16 x i32>",
            f"  %wh{s} = bitcast <64 x i8> %wh{s}8 to <16 x i32>"]
    # each dword holds two bf16 values: low word << 16 and high word & 0xFFFF0000 are the two
    # floats (ALU ops, not shuffles: the shuffle port was the bottleneck)
    for k, (w, op) in enumerate((("wl", "shl"), ("wl", "and"), ("wh", "shl"), ("wh", "and"))):
        arg = _vec("i32", 16, 16) if op == "shl" else _vec("i32", 16, -65536)
        body += [f"  %d{s}{k} = {op} <16 x i32> %{w}{s}, {arg}",
                 f"  %f{s}{k} = bitcast <16 x i32> %d{s}{k} to <16 x float>"]
    return body


def _fp8_decode_avx2(s: str, p: str) -> list:
    """64 fp8 codes at %{p} -> %f{s}0..7 <8 x float> = value * 2^-8, in fp8_order (vector k = 2q + h holds
    half h of the AVX-512 kernel's vector q). Per 32 bytes: the quads permuted (0, 2, 1, 3), then each
    16-bit word's even byte (word << 8) and odd byte (the word itself) become the half-precision pattern
    s 0 eeee mmm 0000000 (>> 1 arithmetic, & 0xBF80) whose value is e4m3 * 2^-8 (subnormals included;
    the NaN codes decode as +-480 as in cpu_experts/fp8.py), and vcvtph2ps (F16C) widens them."""
    body = []
    for h in range(2):
        v = f"%v{s}{h}"
        body += [f"  {v}p = getelementptr i8, ptr %{p}, i64 {32 * h}",
                 f"  {v} = load <4 x i64>, ptr {v}p, align 1",
                 f"  {v}q = shufflevector <4 x i64> {v}, <4 x i64> poison, <4 x i32> <i32 0, i32 2, i32 1, i32 3>",
                 f"  {v}w = bitcast <4 x i64> {v}q to <16 x i16>",
                 f"  {v}e0 = shl <16 x i16> {v}w, {_vec('i16', 16, 8)}",
                 f"  {v}e1 = ashr <16 x i16> {v}e0, {_vec('i16', 16, 1)}",
                 f"  {v}e = and <16 x i16> {v}e1, {_vec('i16', 16, -16512)}",
                 f"  {v}o1 = ashr <16 x i16> {v}w, {_vec('i16', 16, 1)}",
                 f"  {v}o = and <16 x i16> {v}o1, {_vec('i16', 16, -16512)}"]
        for q, (src, lo) in enumerate((("e", 0), ("o", 0), ("e", 8), ("o", 8))):
            k = 2 * q + h
            body += [f"  %g{s}{k} = shufflevector <16 x i16> {v}{src}, <16 x i16> poison, <8 x i32> "
                     f"{_mask(range(lo, lo + 8))}",
                     f"  %g{s}{k}h = bitcast <8 x i16> %g{s}{k} to <8 x half>",
                     f"  %f{s}{k} = fpext <8 x half> %g{s}{k}h to <8 x float>"]
    return body


def _bf16_decode(s: str, p: str, W: int) -> list:
    """32 bf16 values at %{p} -> %f{s}0..(32/W - 1) <W x float>: bits << 16."""
    body = [f"  %v{s} = load <32 x i16>, ptr %{p}, align 1",
            f"  %z{s} = zext <32 x i16> %v{s} to <32 x i32>",
            f"  %h{s}1 = shl <32 x i32> %z{s}, {_vec('i32', 32, 16)}",
            f"  %f{s} = bitcast <32 x i32> %h{s}1 to <32 x float>"]
    for k in range(32 // W):
        body.append(f"  %f{s}{k} = shufflevector <32 x float> %f{s}, <32 x float> poison, "
                    f"<{W} x i32> {_mask(range(W * k, W * k + W))}")
    return body


def _float_kernel(name: str, fmt: str, nt: int, isa: str) -> str:
    """fp8 (64 codes per chunk) or bf16 (32), nt tokens, vectors of WIDTH[isa] floats."""
    W = WIDTH[isa]
    K = (64 if fmt == "fp8" else 32) // W      # float vectors per 64-byte chunk
    na = max(1, min(K, 4 // nt))                 # accumulators per (row, token): enough FMA chains in flight
    phis, body, fin = [], [], []
    for s in "AB":
        for t in range(nt):
            for k in range(na):
                phis.append(f"  %acc{s}{t}_{k} = phi <{W} x float> [zeroinitializer, %row], [%acc{s}{t}_{k}.n, %chunk]")
    body.append(f"  %xo = mul i64 %c, {K * W}")
    for t in range(nt):
        body.append(f"  %xt{t} = mul i64 %tx, {t}")
        body.append(f"  %xc{t} = add i64 %xo, %xt{t}")
    for s, p in (("A", "pa"), ("B", "pb")):
        if fmt == "bf16":
            body += _bf16_decode(s, p, W)
        else:
            body += _fp8_decode_avx512(s, p) if isa == "avx512" else _fp8_decode_avx2(s, p)
    # Both rows use the same activations (xA; every caller passes xB == xA): one load feeds two FMAs.
    cur = {(s, t, k): f"%acc{s}{t}_{k}" for s in "AB" for t in range(nt) for k in range(na)}
    for t in range(nt):
        for k in range(K):
            a = k % na
            body += [f"  %xi{t}_{k} = add i64 %xc{t}, {W * k}",
                     f"  %px{t}_{k} = getelementptr float, ptr %xA, i64 %xi{t}_{k}",
                     f"  %x{t}_{k} = load <{W} x float>, ptr %px{t}_{k}, align 4"]
            for s in "AB":
                res = f"%acc{s}{t}_{a}.n" if k + na >= K else f"%m{s}{t}_{k}"    # last FMA of its chain
                body.append(f"  {res} = call <{W} x float> @llvm.fma.v{W}f32(<{W} x float> %f{s}{k}, "
                            f"<{W} x float> %x{t}_{k}, <{W} x float> {cur[(s, t, a)]})")
                cur[(s, t, a)] = res
    scale = "256.0" if fmt == "fp8" and isa == "avx2" else ""      # the half-precision decode's 2^-8
    for s in "AB":
        for t in range(nt):
            fin += _store(s, t, [f"%acc{s}{t}_{k}.n" for k in range(na)], W, scale)
    return _SKELETON.format(loc=PREFETCH_LOCALITY, name=name, params="ptr %wA, ptr %wB, ptr %xA, ptr %xB", row_setup="",
                            phis="\n".join(phis), body="\n".join(body), final="\n".join(fin))


def _int4_dot(s: str, t: int, isa: str) -> list:
    """Row s, token t: %dot{s}{t}_{h} <W x i32> = corrections + nibbles . int8 activations, per 4-byte lane
    (h: the 256-bit halves on avx2). avx512: two vpdpbusd; avx2: vpmaddubsw (u8 x s8 -> i16 pairs; at most
    2 * 15 * 127 per pair, so low + high nibble sums fit in i16 unsaturated) and vpmaddwd by ones."""
    if isa == "avx512":
        return [f"  %d{s}{t}1 = call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> %cv{t}_0, "
                f"<16 x i32> %l{s}_0, <16 x i32> %xl{t}_0)",
                f"  %dot{s}{t}_0 = call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> %d{s}{t}1, "
                f"<16 x i32> %h{s}_0, <16 x i32> %xh{t}_0)"]
    body = []
    for h in range(2):
        m = f"%m{s}{t}_{h}"
        body += [f"  {m}l = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %l{s}_{h}, <32 x i8> %xl{t}_{h})",
                 f"  {m}h = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %h{s}_{h}, <32 x i8> %xh{t}_{h})",
                 f"  {m} = add <16 x i16> {m}l, {m}h",
                 f"  {m}d = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> {m}, <16 x i16> {_vec('i16', 16, 1)})",
                 f"  %dot{s}{t}_{h} = add <8 x i32> {m}d, %cv{t}_{h}"]
    return body


def _int4_kernel(name: str, gs: int, nt: int, isa: str) -> str:
    """The LLVM IR text of one INT4 x int8 row kernel (group size gs, nt tokens per pass, isa's vectors).

    Long: it is one IR template, emitted line by line in the order the instructions run; split into
    helpers it would lose the one-screen view of the loop that reviewing generated code needs.
    """
    W = WIDTH[isa]
    nh = 16 // W                                    # vectors per 64-byte chunk
    ns = 128 // gs                                  # scales per 64-byte chunk
    lt = "<16 x i32>" if isa == "avx512" else "<32 x i8>"       # the dot instruction's operand type
    row_setup = ["  %so = mul i64 %r, %sstride",
                 "  %sa = getelementptr i8, ptr %sA, i64 %so",
                 "  %sb = getelementptr i8, ptr %sB, i64 %so"]
    phis = [f"  %acc{s}{t}_{h} = phi <{W} x float> [zeroinitializer, %row], [%acc{s}{t}_{h}.n, %chunk]"
            for s in "AB" for t in range(nt) for h in range(nh)]
    body = [f"  %sbo = mul i64 %c, {2 * ns}",
            "  %xo = shl i64 %c, 7",
            "  %co = shl i64 %c, 4",
            "  %txs = lshr i64 %tx, 7",              # scales per token row: tx / 128
            "  %txc = lshr i64 %tx, 3"]              # corrections per token row: tx / 8
    for s, p in (("A", "pa"), ("B", "pb")):
        low = s.lower()
        body += [f"  %v{s} = load <64 x i8>, ptr %{p}, align 1",
                 f"  %l{s} = and <64 x i8> %v{s}, {_vec('i8', 64, 15)}",
                 f"  %h{s} = lshr <64 x i8> %v{s}, {_vec('i8', 64, 4)}",
                 f"  %ps{s} = getelementptr i8, ptr %s{low}, i64 %sbo",
                 f"  %sv{s} = load <{ns} x i16>, ptr %ps{s}, align 2",
                 f"  %sz{s} = zext <{ns} x i16> %sv{s} to <{ns} x i32>",
                 f"  %ss{s} = shl <{ns} x i32> %sz{s}, {_vec('i32', ns, 16)}",
                 f"  %sf{s} = bitcast <{ns} x i32> %ss{s} to <{ns} x float>"]
        for h in range(nh):
            lanes = range(W * h, W * h + W)
            body += [f"  %sw{s}_{h} = shufflevector <{ns} x float> %sf{s}, <{ns} x float> poison, "
                     f"<{W} x i32> {_mask([(lane // 4) * ns // 4 for lane in lanes])}"]
            for x in "lh":
                body += [f"  %{x}{s}_{h}8 = shufflevector <64 x i8> %{x}{s}, <64 x i8> poison, <{4 * W} x i32> "
                         f"{_mask(range(4 * W * h, 4 * W * h + 4 * W))}",
                         f"  %{x}{s}_{h} = bitcast <{4 * W} x i8> %{x}{s}_{h}8 to {lt}"]
    fin = []
    for t in range(nt):
        body += [f"  %xt{t} = mul i64 %tx, {t}",
                 f"  %xb{t} = add i64 %xo, %xt{t}",
                 f"  %px{t} = getelementptr i8, ptr %xq, i64 %xb{t}",
                 f"  %ct{t} = mul i64 %txc, {t}",
                 f"  %cb{t} = add i64 %co, %ct{t}",
                 f"  %pc{t} = getelementptr i32, ptr %corr, i64 %cb{t}",
                 f"  %st{t} = mul i64 %txs, {t}",
                 f"  %sb{t} = add i64 %c, %st{t}",
                 f"  %pxs{t} = getelementptr float, ptr %xs, i64 %sb{t}",
                 f"  %xsc{t} = load float, ptr %pxs{t}, align 4",
                 f"  %xsv0{t} = insertelement <{W} x float> poison, float %xsc{t}, i64 0",
                 f"  %xsv{t} = shufflevector <{W} x float> %xsv0{t}, <{W} x float> poison, <{W} x i32> zeroinitializer"]
        for h in range(nh):
            body += [f"  %pxl{t}_{h} = getelementptr i8, ptr %px{t}, i64 {4 * W * h}",
                     f"  %pxh{t}_{h} = getelementptr i8, ptr %px{t}, i64 {64 + 4 * W * h}",
                     f"  %xl{t}_{h} = load {lt}, ptr %pxl{t}_{h}, align 1",
                     f"  %xh{t}_{h} = load {lt}, ptr %pxh{t}_{h}, align 1",
                     f"  %pc{t}_{h} = getelementptr i32, ptr %pc{t}, i64 {W * h}",
                     f"  %cv{t}_{h} = load <{W} x i32>, ptr %pc{t}_{h}, align 4"]
        for s in "AB":
            body += _int4_dot(s, t, isa)
            for h in range(nh):
                body += [f"  %fi{s}{t}_{h} = sitofp <{W} x i32> %dot{s}{t}_{h} to <{W} x float>",
                         f"  %sc{s}{t}_{h} = fmul <{W} x float> %sw{s}_{h}, %xsv{t}",
                         f"  %acc{s}{t}_{h}.n = call <{W} x float> @llvm.fma.v{W}f32(<{W} x float> %fi{s}{t}_{h}, "
                         f"<{W} x float> %sc{s}{t}_{h}, <{W} x float> %acc{s}{t}_{h})"]
            fin += _store(s, t, [f"%acc{s}{t}_{h}.n" for h in range(nh)], W)
    return _SKELETON.format(loc=PREFETCH_LOCALITY, name=name, params="ptr %wA, ptr %wB, ptr %sA, ptr %sB, i64 %sstride, ptr %xq, "
                            "ptr %xs, ptr %corr", row_setup="\n".join(row_setup), phis="\n".join(phis),
                            body="\n".join(body), final="\n".join(fin))


def _read_kernel(name: str, prefetch: bool) -> str:
    """The bandwidth probe: sum 64-byte chunks as <16 x i32> (the kernels' load shape), optional prefetch."""
    pf = ["  %pf = getelementptr i8, ptr %p, i64 %pfd",
          "  call void @llvm.prefetch.p0(ptr %pf, i32 0, i32 3, i32 1)"] if prefetch else []
    return "\n".join([
        f"define void @{name}(ptr %a, i64 %nch, i64 %pfd, ptr %out) {{",
        "entry:", "  br label %loop", "loop:",
        "  %c = phi i64 [0, %entry], [%c.next, %loop]",
        "  %acc = phi <16 x i32> [zeroinitializer, %entry], [%acc.n, %loop]",
        "  %off = shl i64 %c, 6",
        "  %p = getelementptr i8, ptr %a, i64 %off", *pf,
        "  %v = load <16 x i32>, ptr %p, align 1",
        "  %acc.n = add <16 x i32> %acc, %v",
        "  %c.next = add i64 %c, 1",
        "  %more = icmp slt i64 %c.next, %nch",
        "  br i1 %more, label %loop, label %done", "done:",
        "  %r = call i32 @llvm.vector.reduce.add.v16i32(<16 x i32> %acc.n)",
        "  store i32 %r, ptr %out, align 4", "  ret void", "}",
        "declare i32 @llvm.vector.reduce.add.v16i32(<16 x i32>)"])


TOKENS = (1, 2, 4)   # token-block sizes: 1 for decode, 4 (2, 1 for the rest) for prefill. 8 spilled
#                      registers: int4 prefill fell from 624 to 476 GFLOP/s, fp8/bf16 within noise.
KERNELS = {}
KERNEL_ISA = {}            # the ISA each table kernel needs: LLVM aborts on an intrinsic the target lacks
for _isa in ISAS:
    for _nt in TOKENS:
        for _g in (32, 64, 128):
            _n = f"cx_int4_{_isa}_g{_g}_t{_nt}_v{VERSION}"
            KERNELS[_n], KERNEL_ISA[_n] = _int4_kernel(_n, _g, _nt, _isa), _isa
        for _f in ("fp8", "bf16"):
            _n = f"cx_{_f}_{_isa}_t{_nt}_v{VERSION}"
            KERNELS[_n], KERNEL_ISA[_n] = _float_kernel(_n, _f, _nt, _isa), _isa
KERNELS[f"cx_read_v{VERSION}"] = _read_kernel(f"cx_read_v{VERSION}", False)
KERNELS[f"cx_read_pf_v{VERSION}"] = _read_kernel(f"cx_read_pf_v{VERSION}", True)


def _emit_call(context, builder, fnames: tuple[str, ...], sig, args, table: bool = False):
    """Link the kernels' IR into the library being compiled and call one with raw pointers/ints.

    table=False: fnames holds one kernel, called with every argument. table=True: the first argument is
    an index into fnames and the call is an LLVM switch over direct calls, one per kernel (static calls,
    the same machine code as an if-chain of calls; an index out of range, or of a kernel whose ISA the
    compile target lacks (not linked), calls nothing).

    Long: the linking, the argument casts and the switch are one llvmlite codegen callback; its steps share
    the builder's state, so they stay together.
    """
    lib = context.active_code_library
    linked = lib.__dict__.setdefault("_cx_linked", set())    # link each kernel once per library
    usable = [f not in KERNEL_ISA or supported(KERNEL_ISA[f]) for f in fnames]
    for fname, ok in zip(fnames, usable):
        if ok and fname not in linked:
            mod = ll.parse_assembly(_DECLS + KERNELS[fname])
            mod.verify()
            lib.add_llvm_module(mod)
            linked.add(fname)
    index = None
    if table:
        index = context.cast(builder, args[0], sig.args[0], types.int64)
        sig, args = types.void(*sig.args[1:]), args[1:]
    ptr = ir.PointerType()
    vals, tys = [], []
    for ty, v in zip(sig.args, args):
        if isinstance(ty, types.Array):
            ary = context.make_array(ty)(context, builder, v)
            vals.append(builder.bitcast(ary.data, ptr))
            tys.append(ptr)
        else:
            vals.append(context.cast(builder, v, ty, types.int64))
            tys.append(ir.IntType(64))
    # array arguments are passed as (array, element offset) pairs: fold the offset into the pointer
    out_vals, out_tys, i = [], [], 0
    while i < len(sig.args):
        if isinstance(sig.args[i], types.Array):
            elt = context.get_data_type(sig.args[i].dtype)
            p = builder.gep(vals[i], [vals[i + 1]], source_etype=elt)
            out_vals.append(builder.bitcast(p, ptr))
            out_tys.append(ptr)
            i += 2
        else:
            out_vals.append(vals[i])
            out_tys.append(tys[i])
            i += 1
    fns = [(builder.module.globals.get(f) or ir.Function(builder.module, ir.FunctionType(ir.VoidType(), out_tys), f))
           if ok else None for f, ok in zip(fnames, usable)]
    if index is None:
        builder.call(fns[0], out_vals)
        return context.get_dummy_value()
    done = builder.append_basic_block("cx.done")
    switch = builder.switch(index, done)
    for k, fn in enumerate(fns):
        if fn is None:
            continue
        block = builder.append_basic_block(f"cx.k{k}")
        switch.add_case(ir.Constant(ir.IntType(64), k), block)
        with builder.goto_block(block):
            builder.call(fn, out_vals)
            builder.branch(done)
    builder.position_at_end(done)
    return context.get_dummy_value()


# The kernel tables: one intrinsic per family whose first argument picks the kernel (int4: group size x
# token block, fp8/bf16: token block); then (array, element offset) pairs for the pointers, in the IR
# parameter order. Index helpers: cpu_experts/int4_vnni.py (int4_index) and token_index below.
INT4_GROUPS = (32, 64, 128)
INT4_TABLE = tuple(f"cx_int4_{i}_g{g}_t{t}_v{VERSION}" for i in ISAS for g in INT4_GROUPS for t in TOKENS)
FLOAT_TABLES = {f: tuple(f"cx_{f}_{i}_t{t}_v{VERSION}" for i in ISAS for t in TOKENS) for f in ("fp8", "bf16")}


def _table(names: tuple[str, ...]):
    return lambda context, builder, s, a: _emit_call(context, builder, names, s, a, table=True)


@intrinsic
def int4_vnni(typingctx, k, wa, owa, wb, owb, sa, osa, sb, osb, sstride, xq, oxq, xs, oxs, corr, ocorr, tx,
              wstride, nch, n, outa, oouta, outb, ooutb, ostride, otstride, pfd, accum):
    """INT4 x int8 row kernel number k of INT4_TABLE (k = (isa index * 3 + group index) * len(TOKENS) + token
    index)."""
    sig = types.void(k, wa, owa, wb, owb, sa, osa, sb, osb, sstride, xq, oxq, xs, oxs, corr, ocorr, tx,
                     wstride, nch, n, outa, oouta, outb, ooutb, ostride, otstride, pfd, accum)
    return sig, _table(INT4_TABLE)


def _float_table(fmt: str):
    @intrinsic
    def call(typingctx, k, wa, owa, wb, owb, xa, oxa, xb, oxb, tx, wstride, nch, n, outa, oouta, outb, ooutb,
             ostride, otstride, pfd, accum):
        sig = types.void(k, wa, owa, wb, owb, xa, oxa, xb, oxb, tx, wstride, nch, n, outa, oouta, outb, ooutb,
                         ostride, otstride, pfd, accum)
        return sig, _table(FLOAT_TABLES[fmt])
    return call


fp8 = _float_table("fp8")      # fp8(float_index(isa, nt), ...): FLOAT_TABLES["fp8"][k]
bf16 = _float_table("bf16")


def _read_impl(prefetch: bool):
    name = f"cx_read{'_pf' if prefetch else ''}_v{VERSION}"

    @intrinsic
    def call(typingctx, a, oa, nch, pfd, out, oout):
        """Sum nch 64-byte chunks of `a` from byte offset oa (a uint8), result into out[oout] (int32)."""
        sig = types.void(a, oa, nch, pfd, out, oout)
        return sig, lambda context, builder, s, args: _emit_call(context, builder, (name,), s, args)
    return call


read_chunks = _read_impl(False)
read_chunks_prefetch = _read_impl(True)
