"""Dense layers on the expert kernels (cpu_experts/linear.py) against ONE reference: the weight dequantized
with quant's codecs (PackedMatrix.dequantize), then a float64 product (cpu_experts/reference.py).

Tolerances, relative to max|ref|:
- float activations (fp8 and bf16 on every path, int4 with activations="float"): 5e-5. The kernels use
  exactly the reference's dequantized weights; the only difference is float32 accumulation in another
  order (observed <= 5e-7), while a wrong nibble, scale or row shows up at 1e-2 or more.
- int4 with int8 activations (VNNI): 4e-2, the bound the expert kernels document (observed 5e-3 to 8e-3
  for one product, 1.5e-2 to 2e-2 for an MLP, whose intermediate activation is quantized too).
Shapes are small and cover every path: K a multiple of 128 (fast path for all formats), K = 96 (fp8 and
int4 run plain: not a multiple of 64 / 128), K = 48 (int4 cannot hold it: bf16 fallback; bf16 plain).
"""
import numpy as np
import pytest

from cpu_experts import ir, linear, reference
from cpu_experts.linear import PackedLinear, PackedMLP
from cpu_experts.pool import RowPool
from quant import fp8 as qfp8
from quant.packed import PackedMatrix

FLOAT_TOL, INT8_TOL = 5e-5, 4e-2
FMTS = ("int4", "fp8", "bf16")


@pytest.fixture(scope="module")
def pool():
    p = RowPool(2)
    yield p
    p.close()


@pytest.fixture
def threaded(monkeypatch):
    """Every product on all threads, however small (the default runs small ones on the caller alone)."""
    monkeypatch.setattr(linear, "SERIAL_BYTES", 0)


def _err(got, ref):
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _tol(path):
    return INT8_TOL if path == "int4-int8" else FLOAT_TOL


def _weight(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("N, K", [(300, 256), (130, 96), (64, 48)])
@pytest.mark.parametrize("kernels, activations", [("auto", "auto"), ("auto", "float"), ("plain", "auto")])
def test_linear_every_format_and_path(pool, threaded, fmt, N, K, kernels, activations, isa):
    rng = np.random.default_rng(N + K)
    w = PackedMatrix.quantize(_weight(rng, N, K), fmt)
    lin = PackedLinear(w, activations=activations, kernels=kernels)
    fast = kernels == "auto" and K % {"int4": 128, "fp8": 64, "bf16": 32}[w.fmt] == 0
    want = "plain" if not fast or (w.fmt == "int4" and activations == "float") else \
        {"int4": "int4-int8", "fp8": isa, "bf16": isa}[w.fmt]
    assert lin.path == want
    out = np.full((9, N), np.nan, np.float32)               # reused across calls, overwritten
    for T in (1, 3, 9):                                    # 9 >= TILE_MIN_TOKENS: the plain path's GEMM tiles
        x = rng.standard_normal((T, K)).astype(np.float32)
        got = lin.run(x, out[:T], pool)
        assert got is not None and _err(out[:T], reference.linear_forward(w.dequantize(), x)) <= _tol(lin.path)


def test_int4_that_cannot_hold_the_shape_falls_back_to_bf16():
    w = PackedMatrix.quantize(np.ones((8, 48), np.float32), "int4")
    assert (w.fmt, w.requested, w.fell_back) == ("bf16", "int4", True)
    with pytest.raises(ValueError, match="multiple of the group size"):
        PackedMatrix.quantize(np.ones((8, 48), np.float32), "int4", fallback=False)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kernels", ["auto", "plain"])
def test_grouped_linear_per_head(pool, threaded, fmt, kernels):
    """MLA's absorbed kv_b: out[t, g] = W[g] @ x[t, g], G heads each with its own activation row."""
    rng = np.random.default_rng(7)
    G, N, K = 3, 70, 128
    w = PackedMatrix.quantize(_weight(rng, G, N, K), fmt)
    lin = PackedLinear(w, kernels=kernels)
    for T in (1, 2, 5):
        x = rng.standard_normal((T, G, K)).astype(np.float32)
        out = lin.run(x, np.empty((T, G, N), np.float32), pool)
        assert _err(out, reference.linear_forward(w.dequantize(), x)) <= _tol(lin.path)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kernels, activations", [("auto", "auto"), ("auto", "float"), ("plain", "auto")])
def test_mlp_fused_swiglu(pool, threaded, fmt, kernels, activations):
    rng = np.random.default_rng(3)
    H, I = 256, 384
    mats = [PackedMatrix.quantize(_weight(rng, *s), fmt) for s in ((I, H), (I, H), (H, I))]
    mlp = PackedMLP(*mats, activations=activations, kernels=kernels)
    for T in (1, 3, 6):                                    # 6: the plain path's tiles
        x = rng.standard_normal((T, H)).astype(np.float32)
        out = mlp.run(x, np.empty((T, H), np.float32), pool)
        ref = reference.expert_forward(*(m.dequantize()[0] for m in mats), x)
        assert _err(out, ref) <= _tol(mlp.path)


def test_fp8_release_bytes_are_kept_and_used_as_they_are(pool):
    """A released block-FP8 weight with ragged edges (K2's kv_a has 576 rows): wrapped, not re-quantized."""
    rng = np.random.default_rng(5)
    N, K = 200, 320
    codes = rng.integers(0, 256, (N, K), dtype=np.uint8)
    codes[(codes & 0x7F) >= 0x70] &= 0x87                    # no NaN codes, moderate magnitudes
    scale = rng.uniform(0.5, 2.0, qfp8.scale_grid_shape(N, K)).astype(np.float32) / 64
    w = PackedMatrix.from_arrays("fp8", codes, scale)
    np.testing.assert_array_equal(w.codes(), codes)
    np.testing.assert_array_equal(w.dequantize()[0], qfp8.dequantize_blocks(codes, scale))
    x = rng.standard_normal((2, K)).astype(np.float32)
    out = PackedLinear(w).run(x, np.empty((2, N), np.float32), pool)
    assert _err(out, reference.linear_forward(w.dequantize(), x)) <= FLOAT_TOL


def test_bad_shapes_name_the_fix(pool):
    lin = PackedLinear(PackedMatrix.quantize(np.ones((16, 64), np.float32), "bf16"))
    with pytest.raises(ValueError, match=r"takes \[T, 64\]"):
        lin.run(np.ones((1, 32), np.float32), np.empty((1, 16), np.float32), pool)
    with pytest.raises(ValueError, match="C-contiguous float32 array of shape"):
        lin.run(np.ones((2, 64), np.float32), np.empty((2, 16), np.float64), pool)
    g = [PackedMatrix.quantize(np.ones(s, np.float32), f) for s, f in (((32, 64), "bf16"), ((32, 64), "fp8"),
                                                                        ((64, 32), "bf16"))]
    with pytest.raises(ValueError, match="one format"):
        PackedMLP(*g)


@pytest.mark.parametrize("fmt, K", [("int4", 4224), ("fp8", 8320), ("bf16", 2112)])
def test_long_rows_in_two_streams(pool, threaded, fmt, K):
    """Rows longer than half the prefetch distance go through the kernels as two streams half a row block
    apart (int4_vnni.row_pairs): odd block sizes and the column blocks of prefill included."""
    rng = np.random.default_rng(K)
    w = PackedMatrix.quantize(_weight(rng, 75, K), fmt)
    lin = PackedLinear(w)
    for T in (1, 5):
        x = rng.standard_normal((T, K)).astype(np.float32)
        out = lin.run(x, np.empty((T, 75), np.float32), pool)
        assert _err(out, reference.linear_forward(w.dequantize(), x)) <= _tol(lin.path)


def test_experts_and_dense_layers_share_one_pool():
    """CpuMoE on a caller's pool (run() synchronous, submit/wait from its own thread) between dense products:
    every result right, and closing the CpuMoE leaves the shared pool working."""
    from cpu_experts import CpuMoE, LayerStore, StoreSpec
    rng = np.random.default_rng(11)
    H, I, E = 256, 128, 4
    src = {e: {m: _weight(rng, *s) for m, s in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I)))} for e in range(E)}
    store = LayerStore.build(StoreSpec("int4", H, I), E, lambda e: src[e])
    pool = RowPool(2)
    moe = CpuMoE({0: store}, pool=pool, activations="float")
    assert moe.threads == 2
    lin = PackedLinear(PackedMatrix.quantize(_weight(rng, 96, H), "fp8"))
    x = rng.standard_normal((3, H)).astype(np.float32)
    ids, w = np.array([[0, 1], [2, 3], [1, 2]]), np.full((3, 2), 0.5, np.float32)
    ref = reference.moe_forward(store, x, ids, w)
    for _ in range(3):
        ticket = moe.submit(0, x, ids, w)                     # experts on the background thread ...
        y = lin.run(x, np.empty((3, 96), np.float32), pool)   # ... while the caller's products take turns
        assert _err(moe.wait(ticket), ref) <= FLOAT_TOL and _err(moe.run(0, x, ids, w), ref) <= FLOAT_TOL
        assert _err(y, reference.linear_forward(lin.w.dequantize(), x)) <= FLOAT_TOL
    moe.close()
    assert _err(lin.run(x, np.empty((3, 96), np.float32), pool), reference.linear_forward(lin.w.dequantize(), x)) \
        <= FLOAT_TOL
    pool.close()


@pytest.mark.parametrize("shape", [(300, 200), (256, 384), (5, 7)])
def test_fp8_widened_to_bf16_is_the_reference_rounded_once(pool, shape):
    """cpu_experts.fp8.to_bf16_rows (the prefill GEMM's widening): each value is quant's float32 dequantization
    rounded to bf16 once, to nearest even, bit for bit; partial 128-blocks and row splits over the pool included."""
    from cpu_experts import fp8
    from quant.formats import f32_to_bf16_bits
    w = (np.random.default_rng(3).standard_normal(shape) * 0.05).astype(np.float32)
    m = PackedMatrix.quantize(w, "fp8")
    out = np.full(shape, 0xFFFF, np.uint16)
    pool.run(fp8.to_bf16_rows, (m.codes(0), m.scales(0), out), shape[0])
    assert np.array_equal(out, f32_to_bf16_bits(m.dequantize()[0]))
