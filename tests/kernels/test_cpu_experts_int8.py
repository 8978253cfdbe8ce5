"""INT4 fast path (int8 activations x int4 weights, vpdpbusd): exact against an emulation, and bounded
against the float reference.

Stage-wise tests compare the kernels with a float64 computation on the *dequantized int8 activations*
(what the kernel mathematically computes): int32 sums are exact, so the only differences are float32
rounding of the per-chunk scaling and accumulation -> tolerance 5e-5 of max|y|, as for the float paths.
The whole MoE against the float reference differs by the activation quantization itself: per 128
inputs the step is max|x|/127, about 0.6 % rms relative error per Gaussian input, applied twice (x and
the intermediate activation); we observe 1-2e-2 of max|y| on random Gaussian weights and inputs and
bound it at 4e-2.
"""
import numpy as np
import pytest

from cpu_experts import CpuMoE, LayerStore, StoreSpec, ir, reference
from cpu_experts import int4_vnni
from cpu_experts.experts import ExpertLayer

pytestmark = pytest.mark.skipif(not any(map(ir.supported, ir.ISAS)), reason="CPU runs no IR kernels: fast path not used")
TOL = 5e-5


def prepare(x):
    T, n = x.shape
    xq = np.empty((T, n), np.int8)
    xs = np.empty((T, n // 128), np.float32)
    xc = np.empty((T, n // 8), np.int32)
    int4_vnni.prepare_int8(np.ascontiguousarray(x, dtype=np.float32), xq, xs, xc)
    return xq, xs, xc


def dequant_act(x):
    """What prepare_int8 represents, in natural order: rint(x / s) * s per 128 inputs."""
    T, n = x.shape
    b = x.reshape(T, n // 128, 128).astype(np.float32)
    m = np.abs(b).max(axis=2, keepdims=True)
    s = m / np.float32(127.0)
    inv = np.where(m > 0, np.float32(127.0) / np.where(m > 0, m, 1), 0).astype(np.float32)
    return (np.rint(b * inv) * s).reshape(T, n)


def test_prepare_int8_layout_scale_and_correction():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256), dtype=np.float32)
    x[2, :128] = 0                                             # an all-zero chunk
    xq, xs, xc = prepare(x)
    np.testing.assert_array_equal(xs, np.abs(x.reshape(3, 2, 128)).max(axis=2) / np.float32(127))
    codes = np.rint(dequant_act(x) / np.repeat(np.where(xs > 0, xs, 1), 128, axis=1)).astype(np.int8)
    for c in range(2):
        blk = codes[:, 128 * c:128 * c + 128].reshape(3, 4, 2, 16)        # [T, block, lo/hi half, j]
        np.testing.assert_array_equal(xq[:, 128 * c:128 * c + 64], blk[:, :, 0, :].reshape(3, 64))
        np.testing.assert_array_equal(xq[:, 128 * c + 64:128 * c + 128], blk[:, :, 1, :].reshape(3, 64))
        lanes = xq[:, 128 * c:128 * c + 64].reshape(3, 16, 4).astype(np.int32).sum(2) + \
            xq[:, 128 * c + 64:128 * c + 128].reshape(3, 16, 4).astype(np.int32).sum(2)
        np.testing.assert_array_equal(xc[:, 16 * c:16 * c + 16], -8 * lanes)
    assert np.all(xq[2, :128] == 0) and np.all(xs[2, 0] == 0)
    assert np.abs(xq.astype(int)).max() == 127


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("shape", [(256, 128), (7168, 2048)])
def test_vnni_kernels_equal_the_emulation(gs, shape, isa):
    H, I = shape
    if H > 1000 and gs != 32:        # before making 88 M random weights that would not be used
        pytest.skip("K2 shape is checked with group 32 only (what K2 ships)")
    rng = np.random.default_rng(gs + H)
    E = 2
    src = {e: {"gate": rng.standard_normal((I, H), dtype=np.float32),
               "up": rng.standard_normal((I, H), dtype=np.float32),
               "down": rng.standard_normal((H, I), dtype=np.float32)} for e in range(E)}
    store = LayerStore.build(StoreSpec("int4", H, I, gs), E, lambda e: src[e])
    L = ExpertLayer(store, "int4-int8")
    T = 16
    x = rng.standard_normal((T, H), dtype=np.float32)
    # expert 1: 15 tokens (token blocks of 4, 4, 4, 2 and 1), expert 0: token 1 alone
    pairs = [(1, t) for t in range(T) if t != 1] + [(0, 1)]
    grp_e = np.array([1, 0], np.int64)
    grp_ptr = np.array([0, 15, 16], np.int64)
    tok = np.array([t for _, t in pairs], np.int64)
    w = rng.uniform(-1, 2, len(pairs)).astype(np.float32)
    xq, xs, xc = prepare(x[tok])                            # activations in pair order
    act = np.zeros((len(pairs), I), np.float32)
    mid = I // 2 + 3                                        # two uneven row ranges, as two threads would
    for r0, r1 in ((0, mid), (mid, I)):
        int4_vnni.gateup(*L.head, grp_e, grp_ptr, xq, xs, xc, ir.ISAS.index(isa), 8192, r0, r1, act)
    xd = dequant_act(x).astype(np.float64)
    deq = {e: store.dequantize(e) for e in range(E)}
    for p, (e, t) in enumerate(pairs):
        g, u, _ = deq[e]
        ref = reference.silu(xd[t] @ g.T) * (xd[t] @ u.T)
        assert np.abs(act[p] - ref).max() <= TOL * np.abs(ref).max()
    aq, as_, ac = prepare(act)
    out = np.zeros((T, H), np.float32)
    for r0, r1 in ((0, 37), (37, H)):                      # odd row counts exercise the single-row tail
        int4_vnni.down(*L.head, grp_e, grp_ptr, tok, w, aq, as_, ac, ir.ISAS.index(isa), 8192, r0, r1, out)
    ad = dequant_act(act).astype(np.float64)
    ref = np.zeros((T, H))
    for p, (e, t) in enumerate(pairs):
        ref[t] += w[p] * (ad[p] @ deq[e][2].T)
    assert np.abs(out - ref).max() <= TOL * np.abs(ref).max()


@pytest.mark.parametrize("T", [1, 6])
def test_moe_int8_path_is_close_to_the_float_reference(T, isa):
    rng = np.random.default_rng(T)
    H, I, E = 512, 256, 6
    src = {e: {"gate": rng.standard_normal((I, H), dtype=np.float32) / np.sqrt(H),
               "up": rng.standard_normal((I, H), dtype=np.float32) / np.sqrt(H),
               "down": rng.standard_normal((H, I), dtype=np.float32) / np.sqrt(I)} for e in range(E)}
    store = LayerStore.build(StoreSpec("int4", H, I), E, lambda e: src[e])
    moe = CpuMoE({0: store}, threads=2, tile_min_tokens=10**9)
    assert moe.paths() == {0: "int4-int8"}
    exact = CpuMoE({0: store}, threads=2, activations="float", tile_min_tokens=10**9)
    assert exact.paths() == {0: "plain"}
    x = rng.standard_normal((T, H), dtype=np.float32)
    ids = np.stack([rng.choice(E, 4, replace=False) for _ in range(T)])
    ids[0, 1] = -1
    w = rng.random((T, 4)).astype(np.float32)
    ref = reference.moe_forward(store, x, ids, w)
    err = np.abs(moe(0, x, ids, w) - ref).max() / np.abs(ref).max()
    assert 1e-4 < err <= 4e-2                  # really quantized, and within the stated bound
    assert np.abs(exact(0, x, ids, w) - ref).max() <= TOL * np.abs(ref).max()


def test_int8_request_is_checked():
    store = LayerStore.build(StoreSpec("fp8", 128, 64), 1, lambda e: {"gate": np.ones((64, 128)),
                                                                       "up": np.ones((64, 128)),
                                                                       "down": np.ones((128, 64))})
    with pytest.raises(ValueError, match="int8"):
        CpuMoE({0: store}, activations="int8")
