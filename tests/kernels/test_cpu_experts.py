"""CPU MoE kernels vs the slow float64 reference (cpu_experts/reference.py), every format and path.

Float-activation paths only (INT4's int8-activation path: tests/kernels/test_cpu_experts_int8.py). Each case
runs with kernels="plain" (portable Numba) and "auto" (the IR kernels for fp8/bf16), the latter once per
instruction set the host runs (the `isa` fixture: AVX-512 and AVX2 on an AVX-512 host; see CpuMoE.paths()).

Tolerance (float-activation path, all formats): |y - ref| <= 5e-5 * max|ref|. The weights the kernels
use are exactly the reference's dequantized weights, so the only difference is float32 accumulation
(dot products of up to 7168 terms, in a different order): the typical relative error is
sqrt(n) * 2^-24 ~ 5e-6 and we observe <= 1e-6; 5e-5 leaves room without hiding a wrong nibble or
scale, which shows up as errors of order 1e-2 or more.
"""
import numpy as np
import pytest

from cpu_experts import CpuMoE, LayerStore, StoreSpec, ir, reference
from quant import fp8

FMTS = ["int4", "fp8", "bf16"]
TOL = 5e-5


def _random_fp8_experts(rng, H, I, E):
    """Block-FP8 sources (like the official release), cheap to make at K2's shape."""
    out = {}
    for e in range(E):
        out[e] = {}
        for m, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            codes = rng.integers(0, 256, shape, dtype=np.uint8)
            codes[(codes & 0x7F) >= 0x70] &= 0x87            # keep |w| small-ish, no NaN codes
            scale = rng.uniform(0.5, 2.0, fp8.scale_grid_shape(*shape)).astype(np.float32) / np.sqrt(shape[1])
            out[e][m] = (codes, scale)
    return out


def _float_experts(rng, H, I, E):
    return {e: {"gate": rng.standard_normal((I, H), dtype=np.float32) / np.sqrt(H),
                "up": rng.standard_normal((I, H), dtype=np.float32) / np.sqrt(H),
                "down": rng.standard_normal((H, I), dtype=np.float32) / np.sqrt(I)} for e in range(E)}


def _check(moe, store, x, ids, w, layer=0):
    got = moe(layer, x, ids, w)
    ref = reference.moe_forward(store, x, ids, w)
    assert got.dtype == np.float32 and got.shape == x.shape
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(got - ref).max() / scale
    assert err <= TOL, f"relative error {err:.3g} > {TOL}"
    return got


def _routing(rng, T, k, E, unused=(), all_pick=None, skip_frac=0.2):
    """Distinct experts per token, some experts never chosen, one chosen by all, some -1 slots."""
    pool = np.array([e for e in range(E) if e not in unused and e != all_pick])
    ids = np.stack([rng.choice(pool, k, replace=False) for _ in range(T)]).astype(np.int64)
    if all_pick is not None:
        ids[:, 0] = all_pick
    ids[rng.random((T, k)) < skip_frac] = -1
    return ids, rng.random((T, k)).astype(np.float32)


@pytest.fixture(scope="module", params=FMTS)
def small(request):
    rng = np.random.default_rng(FMTS.index(request.param))
    H, I, E = 384, 192, 10
    src = _float_experts(rng, H, I, E)
    store = LayerStore.build(StoreSpec(request.param, H, I), E, lambda e: src[e])
    return store


def _moe(stores, kernels, **kw):
    return CpuMoE(stores, activations="float", kernels=kernels, **kw)


@pytest.mark.parametrize("T", [1, 3, 7, 33])
@pytest.mark.parametrize("path", ["rows", "tile", "mixed"])
@pytest.mark.parametrize("kernels", ["plain", "auto"])
def test_small_shapes_all_paths(small, T, path, kernels, isa):
    rng = np.random.default_rng(T)
    tmin = {"rows": 10**9, "tile": 1, "mixed": 4}[path]
    moe = _moe({0: small}, kernels, threads=2, tile_min_tokens=tmin)
    assert moe.paths() == {0: "plain" if kernels == "plain" or small.spec.fmt == "int4" else isa}
    x = rng.standard_normal((T, small.spec.hidden), dtype=np.float32)
    ids, w = _routing(rng, T, 4, small.n_experts, unused=(1, 7), all_pick=3)
    got = _check(moe, small, x, ids, w)
    assert not np.any(np.isin(ids, (1, 7)))
    st = moe.stats()
    assert st["calls"] == 1 and st["tokens"] == T and st["activations"] == int((ids >= 0).sum())
    if path == "rows":
        assert st["tile_experts"] == 0
    # threads=1 gives the same numbers (each row is computed by one thread either way)
    one = _moe({0: small}, kernels, threads=1, tile_min_tokens=tmin)
    np.testing.assert_allclose(one(0, x, ids, w), got, rtol=0, atol=1e-6 * np.abs(got).max())
    moe.close()
    one.close()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", [(128, 64, 32), (256, 128, 64), (512, 128, 128), (200, 72, 0)])
@pytest.mark.parametrize("kernels", ["plain", "auto"])
def test_random_shapes_and_group_sizes(fmt, shape, kernels):
    H, I, gs = shape
    if gs == 0:                      # ragged 128-blocks: fp8 and bf16 only (int4 needs multiples of 32)
        if fmt == "int4":
            pytest.skip("int4 needs H and I multiples of 32")
        gs = 32
    rng = np.random.default_rng(H + I)
    src = _float_experts(rng, H, I, 5)
    store = LayerStore.build(StoreSpec(fmt, H, I, group_size=gs), 5, lambda e: src[e])
    moe = _moe({7: store}, kernels, threads=2)
    for T in (1, 5, 16):
        x = rng.standard_normal((T, H), dtype=np.float32)
        ids, w = _routing(rng, T, 3, 5)
        _check(moe, store, x, ids, w, layer=7)
    moe.close()


@pytest.fixture(scope="module", params=FMTS)
def k2_store(request):
    """K2's expert shape (H=7168, I=2048) with 3 experts from block-FP8 sources (cheap to make)."""
    rng = np.random.default_rng(11)
    H, I, E = 7168, 2048, 3
    src = _random_fp8_experts(rng, H, I, E)
    return LayerStore.build(StoreSpec(request.param, H, I), E, lambda e: src[e])


# The plain kernels at K2's shape are slow-only: the fast suite runs them on every path at small and random
# shapes, and runs K2's shape on "auto" (which is the plain kernel where AVX-512 is missing, and for int4 with
# float activations).
@pytest.mark.parametrize("kernels", [pytest.param("plain", marks=pytest.mark.slow), "auto"])
def test_k2_shape_few_experts(k2_store, kernels):
    """Decode (1 token) and a small prefill at K2's shape; expert 0 chosen by all tokens, 1 by none."""
    store, H = k2_store, k2_store.spec.hidden
    rng = np.random.default_rng(12)
    moe = _moe({0: store}, kernels, threads=2)
    x = rng.standard_normal((1, H), dtype=np.float32)
    _check(moe, store, x, np.array([[2, -1, 0]]), np.array([[0.5, 0.3, 0.2]], np.float32))
    x = rng.standard_normal((5, H), dtype=np.float32)
    ids = np.array([[0, 2], [0, -1], [0, 2], [0, -1], [0, -1]])
    _check(moe, store, x, ids, rng.random((5, 2)).astype(np.float32))
    moe.close()


def test_submit_is_async_and_results_keep_their_order(small):
    rng = np.random.default_rng(5)
    moe = CpuMoE({0: small, 1: small}, threads=2)
    calls = []
    for i in range(6):
        x = rng.standard_normal((1 + i, small.spec.hidden), dtype=np.float32)
        ids, w = _routing(rng, 1 + i, 3, small.n_experts)
        calls.append((i % 2, x, ids, w, moe.submit(i % 2, x, ids, w)))
    for layer, x, ids, w, t in reversed(calls):
        np.testing.assert_allclose(moe.wait(t), reference.moe_forward(small, x, ids, w),
                                   atol=TOL * 10, rtol=TOL)
    assert moe.stats()["calls"] == 6
    moe.close()


def test_all_slots_skipped_gives_zeros(small):
    moe = CpuMoE({0: small}, threads=2)
    x = np.ones((2, small.spec.hidden), np.float32)
    out = moe(0, x, np.full((2, 8), -1), np.ones((2, 8), np.float32))
    np.testing.assert_array_equal(out, 0)
    assert moe.stats()["skipped"] == 16
    moe.close()


def test_bad_calls_raise_with_the_value(small):
    moe = CpuMoE({0: small}, threads=1)
    H, E = small.spec.hidden, small.n_experts
    x = np.zeros((2, H), np.float32)
    with pytest.raises(KeyError, match="layer 3"):
        moe.submit(3, x, np.zeros((2, 1), int), np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 9\]"):
        moe.submit(0, x, np.full((2, 1), E), np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="hidden"):
        moe.submit(0, np.zeros((2, H + 1), np.float32), np.zeros((2, 1), int), np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="topk_weights"):
        moe.submit(0, x, np.zeros((2, 2), int), np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="threads"):
        CpuMoE({0: small}, threads=0)
    moe.close()


def test_mmap_store_runs(tmp_path, small):
    small.save(tmp_path / "l.safetensors")
    store = LayerStore.load(tmp_path / "l.safetensors")
    moe = CpuMoE({0: store}, threads=2)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, small.spec.hidden), dtype=np.float32)
    ids, w = _routing(rng, 3, 4, small.n_experts)
    _check(moe, store, x, ids, w)
    moe.close()


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_fast_drivers_on_odd_row_ranges(fmt, isa):
    """Row ranges that are not multiples of the row pairs / blocks, and groups of 1, 2, 4+4+4+2+1 tokens."""
    from cpu_experts import bf16_avx512, fp8_avx512
    from cpu_experts.experts import ExpertLayer
    mod = fp8_avx512 if fmt == "fp8" else bf16_avx512
    rng = np.random.default_rng(21)
    H, I, E = 2048 + 128, 1024 + 128, 3             # 3 and 2 column blocks of 1024
    src = _float_experts(rng, H, I, E)
    store = LayerStore.build(StoreSpec(fmt, H, I), E, lambda e: src[e])
    L = ExpertLayer(store, isa)
    T = 15
    x = rng.standard_normal((T, H), dtype=np.float32)
    pairs = [(2, t) for t in range(15)] + [(0, 3)] + [(1, 5), (1, 6)]       # blocks of 4, 4, 4, 2, 1 tokens
    grp_e, grp_ptr = np.array([2, 0, 1], np.int64), np.array([0, 15, 16, 18], np.int64)
    tok = np.array([t for _, t in pairs], np.int64)
    w = rng.uniform(-1, 1, len(pairs)).astype(np.float32)
    act = np.zeros((len(pairs), I), np.float32)
    xin = x[:, ir.fp8_order(H)] if fmt == "fp8" else x            # fp8 kernels take their own order
    for r0, r1 in ((0, 45), (45, 200), (200, I)):
        mod.gateup(*L.head, grp_e, grp_ptr, xin[tok], L.isa, 8192, r0, r1, act)
    out = np.zeros((T, H), np.float32)
    for r0, r1 in ((0, 37), (37, 1001), (1001, H)):
        mod.down(*L.head, grp_e, grp_ptr, tok, w, act, L.isa, 8192, r0, r1, out)
    ref = np.zeros((T, H))
    nat = act[:, np.argsort(ir.fp8_order(I))] if fmt == "fp8" else act
    for p, (e, t) in enumerate(pairs):
        g, u, d = store.dequantize(e)
        a = reference.silu(x[t].astype(np.float64) @ g.T) * (x[t].astype(np.float64) @ u.T)
        assert np.abs(nat[p] - a).max() <= TOL * np.abs(a).max()
        ref[t] += w[p] * (a @ d.T)
    assert np.abs(out - ref).max() <= TOL * np.abs(ref).max()


def test_empty_calls(small):
    moe = CpuMoE({0: small}, threads=2)
    H = small.spec.hidden
    assert moe(0, np.zeros((0, H), np.float32), np.zeros((0, 8), np.int64), np.zeros((0, 8), np.float32)).shape == (0, H)
    out = moe(0, np.ones((3, H), np.float32), np.zeros((3, 0), np.int32), np.zeros((3, 0), np.float32))
    np.testing.assert_array_equal(out, 0)
    moe.close()
