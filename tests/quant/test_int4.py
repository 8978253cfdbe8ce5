"""INT4 group format: numpy reference round trips, bit-exact."""
import numpy as np
import pytest

from quant import int4
from quant.formats import bf16_bits_to_f32, f32_to_bf16_bits, fp16_bits_to_f32


@pytest.mark.parametrize("shape,group", [((8, 64), 32), ((16, 256), 64), ((3, 384), 128), ((128, 7168), 32)])
def test_quantize_pack_unpack_dequantize_is_bit_exact(shape, group):
    rng = np.random.default_rng(sum(shape) + group)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(1e-3, 10)
    q, s = int4.quantize_groups(w, group)
    assert q.dtype == np.int8 and q.min() >= -7 and q.max() <= 7
    assert s.dtype == np.uint16 and s.shape == (shape[0], shape[1] // group)
    p = int4.pack(q)
    assert p.dtype == np.uint8 and p.shape == (shape[0], shape[1] // 2)
    q2 = int4.unpack(p)
    np.testing.assert_array_equal(q2, q)
    d = int4.dequantize_groups(q2, s, group)
    expect = q.astype(np.float32).reshape(shape[0], -1, group) * bf16_bits_to_f32(s)[:, :, None]
    np.testing.assert_array_equal(d, expect.reshape(shape))
    # the error is at most half a step of each group's scale
    step = np.repeat(bf16_bits_to_f32(s), group, axis=1)
    assert np.all(np.abs(d - w) <= 0.5 * step * (1 + 2 ** -7) + 1e-30)
    # quantizing the dequantized weight again reproduces the codes and scales exactly
    q3, s3 = int4.quantize_groups(d, group)
    np.testing.assert_array_equal(q3, q)
    np.testing.assert_array_equal(s3, s)


def test_full_signed_range_including_minus_8_packs_losslessly():
    q = np.tile(np.arange(-8, 8, dtype=np.int8), (4, 4))           # [4, 64], every code
    np.testing.assert_array_equal(int4.unpack(int4.pack(q)), q)
    s = f32_to_bf16_bits(np.full((4, 2), 0.0371, np.float32))
    d = int4.dequantize_groups(q, s, 32)
    np.testing.assert_array_equal(d, q * bf16_bits_to_f32(s)[0, 0])


def test_pack_layout_is_low_nibbles_first_half_of_each_block():
    q = np.zeros((1, 32), np.int8)
    q[0, 0], q[0, 16], q[0, 15], q[0, 31] = 1, -3, 7, -8
    p = int4.pack(q)
    assert p[0, 0] == (1 + 8) | ((-3 + 8) << 4)
    assert p[0, 15] == (7 + 8) | ((-8 + 8) << 4)


def test_zero_group_and_fp16_scales():
    w = np.zeros((2, 64), np.float32)
    w[1, 32:] = np.linspace(-1, 1, 32)
    q, s = int4.quantize_groups(w, 32, scale_dtype="fp16")
    assert np.all(q[0] == 0) and np.all(s[0] == 0)
    np.testing.assert_array_equal(int4.dequantize_groups(q, s, 32, "fp16")[0], 0)
    assert fp16_bits_to_f32(s[1, 1]) == np.float32(np.float16(1 / 7))


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 1e3,
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40, 1.00390625, 1.01171875], np.float32)])
    ours = f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("bad", [dict(shape=(4, 48), group=32), dict(shape=(4, 64), group=48)])
def test_bad_shapes_raise_with_the_fix(bad):
    with pytest.raises(ValueError, match="int4"):
        int4.quantize_groups(np.zeros(bad["shape"], np.float32), bad["group"])


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        int4.pack(np.full((1, 32), 9, np.int8))
