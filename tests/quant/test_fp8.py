"""FP8 e4m3 block format: reference round trip, and the kernels' table-free decode vs the table."""
import numpy as np
import pytest

from quant import fp8
from cpu_experts.fp8 import e4m3_times_2m8


def test_kernel_decode_equals_reference_table_for_every_finite_code():
    codes = [c for c in range(256) if c & 0x7F != 0x7F]
    got = np.array([e4m3_times_2m8(np.uint8(c)) for c in codes], np.float32) * np.float32(256)
    np.testing.assert_array_equal(got, fp8.E4M3_VALUES[codes])
    assert np.signbit(got[codes.index(0x80)])               # -0 stays -0


@pytest.mark.parametrize("shape", [(128, 256), (576, 200), (192, 256), (7, 130)])
def test_quantize_dequantize_round_trip_is_exact(shape):
    rng = np.random.default_rng(shape[0])
    w = rng.standard_normal(shape).astype(np.float32)
    q, s = fp8.quantize_blocks(w)
    assert s.shape == fp8.scale_grid_shape(*shape)
    d = fp8.dequantize_blocks(q, s)
    q2, s2 = fp8.quantize_blocks(d)
    np.testing.assert_array_equal(s2, s)
    np.testing.assert_array_equal(fp8.dequantize_blocks(q2, s2), d)
    assert np.abs(d - w).max() <= np.abs(w).max() * 2 ** -4      # 3 mantissa bits: half-ulp is 2^-4


def test_codec_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32) * 100
    x = np.clip(x, -448, 448)
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(fp8.e4m3_encode(x), theirs)


def test_avx512_kernel_decodes_every_code_exactly():
    """The IR kernel's table decode (vpermi2b) against the reference table, all 256 codes incl. NaN."""
    from cpu_experts import ir
    if not ir.supported():
        pytest.skip("CPU lacks AVX-512 VBMI/VNNI: the IR kernels are not used")
    from cpu_experts.jit import kernel

    @kernel
    def dots(w, x, out):                       # out[j] = row . x_j for 256 one-hot activation rows
        for j in range(256):
            ir.fp8(0, w, 0, w, 0, x, j * 256, x, j * 256, 256, 256, 4, 1, out, j, out, j, 1, 1, 0, 0)

    order = ir.fp8_order(256)                  # position p of the activation row holds input order[p]
    x = np.zeros((256, 256), np.float32)
    for j in range(256):
        x[j, np.nonzero(order == j)[0][0]] = 1.0
    nan = (np.arange(256) & 0x7F) == 0x7F
    codes = np.where(nan, 0, np.arange(256)).astype(np.uint8)   # a NaN anywhere in the row poisons every dot
    out = np.zeros(256, np.float32)
    dots(codes, x.reshape(-1), out)
    np.testing.assert_array_equal(out[~nan], fp8.E4M3_VALUES[~nan])
    for c in (0x7F, 0xFF):
        dots(np.full(256, c, np.uint8), x.reshape(-1), out)
        assert np.isnan(out).all()
