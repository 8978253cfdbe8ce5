"""LayerStore: build from float / block-FP8 sources, layout, save/load (mmap), bad files."""
import json
import struct

import numpy as np
import pytest

from quant.store import LayerStore, StoreSpec
from quant import fp8, int4
from quant.formats import bf16_bits_to_f32, f32_to_bf16_bits

H, I, E = 256, 128, 3


def _float_experts(seed=0):
    rng = np.random.default_rng(seed)
    return {e: {"gate": rng.standard_normal((I, H), dtype=np.float32),
                "up": rng.standard_normal((I, H), dtype=np.float32),
                "down": rng.standard_normal((H, I), dtype=np.float32)} for e in range(E)}


@pytest.mark.parametrize("fmt", ["int4", "fp8", "bf16"])
def test_build_from_float_matches_the_numpy_reference(fmt):
    src = _float_experts()
    store = LayerStore.build(StoreSpec(fmt, H, I), E, lambda e: src[e])
    assert store.stride % 4096 == 0 and store.buffer.size == E * store.stride
    for e in range(E):
        for m, got in zip(("gate", "up", "down"), store.dequantize(e)):
            w = src[e][m]
            if fmt == "int4":
                q, s = int4.quantize_groups(w, 32)
                expect = int4.dequantize_groups(q, s, 32)
            elif fmt == "fp8":
                expect = fp8.dequantize_blocks(*fp8.quantize_blocks(w))
            else:
                expect = bf16_bits_to_f32(f32_to_bf16_bits(w))
            np.testing.assert_array_equal(got, expect)
    nb = store.expert_nbytes()
    assert nb == {"int4": 3 * H * I // 2 + 3 * H * I // 32 * 2, "fp8": 3 * H * I + 3 * 2 * 4,
                  "bf16": 3 * H * I * 2}[fmt]
    assert store.expert_bytes(1).size == store.stride


def test_fp8_source_keeps_released_bytes_and_int4_dequantizes_it_first():
    rng = np.random.default_rng(1)
    src = {}
    for e in range(E):
        src[e] = {}
        for m, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            codes = rng.integers(0, 256, shape, dtype=np.uint8)
            codes[(codes & 0x7F) == 0x7F] = 0
            src[e][m] = (codes, rng.uniform(1e-4, 1e-2, fp8.scale_grid_shape(*shape)).astype(np.float32))
    s8 = LayerStore.build(StoreSpec("fp8", H, I), E, lambda e: src[e])
    np.testing.assert_array_equal(s8.section(2, "down"), src[2]["down"][0])
    np.testing.assert_array_equal(s8.section(2, "down_scale"), src[2]["down"][1])
    s4 = LayerStore.build(StoreSpec("int4", H, I), E, lambda e: src[e])
    w = fp8.dequantize_blocks(*src[0]["up"])
    np.testing.assert_array_equal(s4.dequantize(0)[1], int4.dequantize_groups(*int4.quantize_groups(w), 32))


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tmp_path, mmap):
    src = _float_experts(2)
    store = LayerStore.build(StoreSpec("int4", H, I, group_size=64), E, lambda e: src[e])
    path = tmp_path / "layer_03.safetensors"
    store.save(path)
    back = LayerStore.load(path, mmap=mmap)
    assert back.spec == store.spec and back.n_experts == E
    assert isinstance(back.buffer, np.memmap) == mmap
    np.testing.assert_array_equal(np.asarray(back.buffer), store.buffer)
    if mmap:
        assert back.buffer.ctypes.data % 4096 == 0         # page-aligned: no copy, experts are whole pages
        assert not back.buffer.flags.writeable
    for a, b in zip(store.dequantize(2), back.dequantize(2)):
        np.testing.assert_array_equal(a, b)


def test_file_is_standard_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    store = LayerStore.build(StoreSpec("bf16", H, I), E, lambda e: _float_experts()[e])
    store.save(tmp_path / "l.safetensors")
    with safetensors.safe_open(str(tmp_path / "l.safetensors"), "np") as f:
        assert f.metadata()["fmt"] == "bf16"
        np.testing.assert_array_equal(f.get_tensor("experts").reshape(-1), store.buffer)


def _write_raw(path, header: dict, data: bytes):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_bad_metadata_and_truncation_raise_naming_the_file(tmp_path):
    store = LayerStore.build(StoreSpec("fp8", H, I), E, lambda e: _float_experts()[e])
    good = tmp_path / "good.safetensors"
    store.save(good)
    meta = store.metadata()
    n = store.buffer.size
    cases = {
        "nometa": {"experts": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}},
        "othermagic": {"__metadata__": dict(meta, format="something"),
                       "experts": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}},
        "version": {"__metadata__": dict(meta, layout_version="99"),
                    "experts": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}},
        "badfmt": {"__metadata__": dict(meta, fmt="int3"),
                   "experts": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}},
        "badhidden": {"__metadata__": dict(meta, hidden="512"),
                      "experts": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}},
    }
    for name, header in cases.items():
        p = tmp_path / f"{name}.safetensors"
        _write_raw(p, header, bytes(n))
        with pytest.raises(ValueError, match=name) as ei:
            LayerStore.load(p)
        assert "convert" in str(ei.value)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="trunc.*truncated"):
        LayerStore.load(trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="junk"):
        LayerStore.load(junk)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="fmt"):
        StoreSpec("int3", H, I)
    with pytest.raises(ValueError, match="group"):
        StoreSpec("int4", H, I, group_size=48)
    with pytest.raises(ValueError, match="shape"):
        LayerStore.build(StoreSpec("bf16", H, I), 1, lambda e: {"gate": np.zeros((H, I)), "up": np.zeros((I, H)),
                                                                 "down": np.zeros((H, I))})
    with pytest.raises(ValueError, match="missing"):
        LayerStore.build(StoreSpec("bf16", H, I), 1, lambda e: {"gate": np.zeros((I, H))})
    store = LayerStore.build(StoreSpec("bf16", H, I), 1, lambda e: _float_experts()[0])
    with pytest.raises(IndexError, match="expert id 5"):
        store.expert_bytes(5)
