"""PackedMatrix (quant/packed.py): the stored arrays kept bit for bit, quantization by the reference codecs,
and the exact rearrangements (row slices, per-group transposes, stacking) checked against the dequantized
matrix, so a rearranged weight multiplies exactly as the original."""
import numpy as np
import pytest

from quant import fp8 as qfp8, int4 as qint4
from quant.codec import decode, encode
from quant.formats import get_format
from quant.packed import PackedMatrix, stack_rows, take_rows, transposed

FMTS = ("int4", "fp8", "bf16")


def _w(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_equals_the_codec_and_keeps_arrays(fmt):
    rng = np.random.default_rng(0)
    w = _w(rng, 2, 300, 256)                          # 2 groups; 300 rows: ragged fp8 blocks, quantized in chunks
    m = PackedMatrix.quantize(w, fmt)
    for g in range(2):
        codes, scales = encode(fmt, w[g])
        np.testing.assert_array_equal(m.codes(g), codes)
        if scales is not None:
            np.testing.assert_array_equal(m.scales(g), scales)
        np.testing.assert_array_equal(m.dequantize()[g], decode(fmt, codes, scales))
    assert m.nbytes == 2 * get_format(fmt).nbytes(300, 256)
    again = PackedMatrix.from_arrays(fmt, np.stack([m.codes(g) for g in range(2)]),
                                     None if fmt == "bf16" else np.stack([m.scales(g) for g in range(2)]))
    np.testing.assert_array_equal(again.buffer, m.buffer)


def test_quantize_in_row_chunks_matches_one_piece(monkeypatch):
    import quant.packed as qp
    rng = np.random.default_rng(1)
    w = _w(rng, 700, 128)
    whole = {f: PackedMatrix.quantize(w, f).buffer.copy() for f in FMTS}
    monkeypatch.setattr(qp, "QUANTIZE_ROWS", 256)
    for f in FMTS:
        np.testing.assert_array_equal(PackedMatrix.quantize(w, f).buffer, whole[f])


@pytest.mark.parametrize("fmt", FMTS)
def test_take_rows_transposed_and_stack_are_exact(fmt):
    rng = np.random.default_rng(2)
    w = _w(rng, 512, 256)
    m = PackedMatrix.quantize(w, fmt)
    d = m.dequantize()[0]
    heads = take_rows(m, [0, 128, 384], 96)            # per-head slices, as kv_b_proj's W_UK / W_UV
    np.testing.assert_array_equal(heads.dequantize(), np.stack([d[0:96], d[128:224], d[384:480]]))
    if fmt == "int4":
        with pytest.raises(ValueError, match="cannot be transposed exactly"):
            transposed(heads)
    else:
        np.testing.assert_array_equal(transposed(heads).dequantize(), heads.dequantize().transpose(0, 2, 1))
    parts = [PackedMatrix.quantize(w[:256], fmt), PackedMatrix.quantize(w[256:], fmt)]
    np.testing.assert_array_equal(stack_rows(parts).buffer, m.buffer)


def test_fp8_slices_must_keep_whole_scale_blocks():
    m = PackedMatrix.quantize(_w(np.random.default_rng(3), 512, 128), "fp8")
    take_rows(m, [64], 32)                             # inside one 128-row block: exact
    with pytest.raises(ValueError, match="cut a 128-row scale block"):
        take_rows(m, [64], 128)
    with pytest.raises(ValueError, match="multiple of 128 rows"):
        stack_rows([PackedMatrix.quantize(np.ones((100, 128), np.float32), "fp8")] * 2)


def test_from_arrays_checks_shapes_and_dtypes():
    q, s = qint4.quantize_groups(np.ones((8, 64), np.float32))
    PackedMatrix.from_arrays("int4", qint4.pack(q), s)
    with pytest.raises(ValueError, match="scales have shape"):
        PackedMatrix.from_arrays("int4", qint4.pack(q), s[:, :1])
    with pytest.raises(ValueError, match="needs scales"):
        PackedMatrix.from_arrays("fp8", np.zeros((8, 64), np.uint8))
    with pytest.raises(ValueError, match="must be uint16"):
        PackedMatrix.from_arrays("bf16", np.zeros((8, 64), np.float32))
    codes, scale = qfp8.quantize_blocks(np.ones((8, 64), np.float32))
    assert PackedMatrix.from_arrays("fp8", codes.view(np.int8), scale).fmt == "fp8"
