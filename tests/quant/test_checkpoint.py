"""Checkpoint reading/writing: round trips (BF16, F32, block FP8 with ragged edges) and every way a
model folder can be broken, each of which must raise CheckpointError naming the file and tensor."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quant.checkpoint import Checkpoint, dequantize_fp8
from quant.errors import CheckpointError
from quant.fp8 import dequantize_blocks, e4m3_decode, quantize_blocks
from quant.writer import fp8_tensors, write_sharded

FP8_SHAPES = {"l.kv_a.weight": (576, 200), "l.q.weight": (192, 256), "l.o.weight": (130, 129)}


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Rows scaled by position, so every 128x128 block gets a different scale_inv.
    return {n: (rng.standard_normal(s) * np.linspace(0.1, 9.0, s[0])[:, None]).astype(np.float32)
            for n, s in FP8_SHAPES.items()}


def _tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = [("model.norm.weight", torch.randn(16, generator=g).to(torch.bfloat16)),
           ("model.embed_tokens.weight", torch.randn(32, 16, generator=g).to(torch.bfloat16)),
           ("l.gate.e_score_correction_bias", torch.randn(8, generator=g))]
    for name, w in _weights(seed).items():
        out += fp8_tensors(name, w)
    return out


def _sharded(tmp_path, max_bytes: int = 60_000):
    paths = write_sharded(tmp_path, _tensors(), max_bytes, metadata={"source": "test"})
    return tmp_path, paths


def _index(folder) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _raises(fn, *needles) -> CheckpointError:
    with pytest.raises(CheckpointError) as e:
        fn()
    for n in needles:
        assert str(n) in str(e.value), f"{n!r} not in message: {e.value}"
    return e.value


def _check_round_trip(ckpt: Checkpoint) -> None:
    src = dict(_tensors())
    assert ckpt.names == sorted(n for n in src if not n.endswith("_scale_inv"))
    for name in ("model.norm.weight", "model.embed_tokens.weight"):
        assert ckpt.dtype(name) == "BF16" and not ckpt.is_fp8(name)
        assert torch.equal(ckpt.get(name, torch.bfloat16), src[name])
        assert torch.equal(ckpt.get(name), src[name].float())
    assert ckpt.dtype("l.gate.e_score_correction_bias") == "F32"
    assert torch.equal(ckpt.get("l.gate.e_score_correction_bias"), src["l.gate.e_score_correction_bias"])
    for name, w in _weights().items():
        q, s = quantize_blocks(w)
        assert ckpt.is_fp8(name) and ckpt.dtype(name) == "F8_E4M3" and ckpt.shape(name) == w.shape
        got = ckpt.get(name, expect_shape=w.shape)
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), dequantize_blocks(q, s))
        assert np.abs(got.numpy() - w).max() <= np.abs(w).max() / 16   # e4m3 keeps 3 mantissa bits
        assert torch.equal(ckpt.get(name, torch.bfloat16), got.to(torch.bfloat16))
        codes, scale = ckpt.get_fp8(name)
        assert codes.dtype == np.uint8 and np.array_equal(codes, q)
        assert scale.dtype == np.float32 and np.array_equal(scale, s)


def test_sharded_round_trip(tmp_path):
    folder, paths = _sharded(tmp_path)
    assert [p.name for p in paths] == [f"model-{i:05d}-of-{len(paths):05d}.safetensors"
                                       for i in range(1, len(paths) + 1)]
    assert len(paths) >= 3
    assert sorted(p.name for p in folder.iterdir()) == sorted([p.name for p in paths] +
                                                              ["model.safetensors.index.json"])
    index = _index(folder)
    src = dict(_tensors())
    assert set(index["weight_map"]) == set(src)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    with Checkpoint.open(folder) as ckpt:
        _check_round_trip(ckpt)
        assert len({ckpt.file_of(n) for n in ckpt.names}) >= 2
        assert ckpt.shard_metadata("l.q.weight") == {"format": "pt", "source": "test"}


def test_single_file_round_trip(tmp_path):
    save_file(dict(_tensors()), str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path) as ckpt:
        _check_round_trip(ckpt)
        assert ckpt.file_of("l.q.weight") == tmp_path / "model.safetensors"


def test_tensor_larger_than_shard_limit_gets_its_own_shard(tmp_path):
    t = {"a": torch.zeros(10), "big": torch.zeros(100), "c": torch.zeros(10), "d": torch.zeros(10)}
    paths = write_sharded(tmp_path, t, max_shard_bytes=80)
    assert len(paths) == 3
    assert _index(tmp_path)["weight_map"] == {"a": paths[0].name, "big": paths[1].name,
                                              "c": paths[2].name, "d": paths[2].name}


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="'a' is given twice"):
        write_sharded(tmp_path, [("a", torch.zeros(2)), ("a", torch.zeros(2))], 100)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        write_sharded(tmp_path, {"a": torch.zeros(2)}, 0)
    assert not list(tmp_path.iterdir())          # nothing half-written left behind


def test_torch_dequant_equals_numpy_reference_bit_exactly():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, size=(300, 257), dtype=np.uint8)   # every code incl. NaN, -0, subnormals
    codes[0, :256] = np.arange(256)
    scale = rng.uniform(1e-4, 3.0, size=(3, 3)).astype(np.float32)
    got = dequantize_fp8(torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(scale))
    assert np.array_equal(got.numpy(), dequantize_blocks(codes, scale), equal_nan=True)
    with pytest.raises(ValueError, match=r"needs \(3, 3\)"):
        dequantize_fp8(torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.ones(2, 3))


def test_ragged_fp8_uses_128_blocks_not_rows_over_scale_rows(tmp_path):
    # transformers 5.24 derives block = rows // scale_rows = 96 for [192, 256]; that must differ here.
    w = _weights()["l.q.weight"]
    q, s = quantize_blocks(w)
    write_sharded(tmp_path, fp8_tensors("l.q.weight", w), 1 << 20)
    with Checkpoint.open(tmp_path) as ckpt:
        got = ckpt.get("l.q.weight").numpy()
    naive = e4m3_decode(q) * np.repeat(np.repeat(s, 96, axis=0), 128, axis=1)
    assert not np.array_equal(got, naive)
    assert np.array_equal(got, dequantize_blocks(q, s))


# ---- broken folders -------------------------------------------------------------------------------

def test_missing_folder_and_empty_folder(tmp_path):
    _raises(lambda: Checkpoint.open(tmp_path / "nope"), "nope", "does not exist")
    _raises(lambda: Checkpoint.open(tmp_path), str(tmp_path), "model.safetensors.index.json")


def test_shards_without_index(tmp_path):
    folder, paths = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").unlink()
    _raises(lambda: Checkpoint.open(folder), paths[0].name, "download model.safetensors.index.json")


def test_missing_shard(tmp_path):
    folder, paths = _sharded(tmp_path)
    paths[1].unlink()
    e = _raises(lambda: Checkpoint.open(folder), paths[1].name, "missing")
    assert e.file == paths[1]


def test_name_in_index_but_not_in_shard(tmp_path):
    folder, paths = _sharded(tmp_path)
    index = _index(folder)
    index["weight_map"]["model.layers.3.ghost.weight"] = paths[0].name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(lambda: Checkpoint.open(folder), paths[0].name, "model.layers.3.ghost.weight", "re-download")


def test_truncated_shard(tmp_path):
    folder, paths = _sharded(tmp_path)
    size = paths[1].stat().st_size
    with open(paths[1], "r+b") as f:
        f.truncate(size - 100)
    _raises(lambda: Checkpoint.open(folder), paths[1].name, f"{size - 100:,}", f"{size:,}", "truncated",
            "re-download this shard")


def test_trailing_bytes(tmp_path):
    folder, paths = _sharded(tmp_path)
    with open(paths[0], "ab") as f:
        f.write(b"\0" * 7)
    _raises(lambda: Checkpoint.open(folder), paths[0].name, "trailing")


@pytest.mark.parametrize("offset, garbage", [(0, b"\xff" * 8), (0, bytes(range(37, 77))),
                                             (8, b"\x00\x13garbage{")])
def test_corrupt_header(tmp_path, offset, garbage):
    folder, paths = _sharded(tmp_path)
    with open(paths[2], "r+b") as f:
        f.seek(offset)
        f.write(garbage)
    _raises(lambda: Checkpoint.open(folder), paths[2].name, "corrupt safetensors header")


def test_empty_shard(tmp_path):
    folder, paths = _sharded(tmp_path)
    paths[0].write_bytes(b"")
    _raises(lambda: Checkpoint.open(folder), paths[0].name, "empty")


def test_offsets_that_do_not_match_shape(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    _raises(lambda: Checkpoint.open(tmp_path), "model.safetensors", "'w'", "16 bytes")


def test_malformed_index_json(tmp_path):
    folder, _ = _sharded(tmp_path)
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-20])
    _raises(lambda: Checkpoint.open(folder), str(index), "not valid JSON", "line")
    index.write_text('{"metadata": {}}')
    _raises(lambda: Checkpoint.open(folder), str(index), "weight_map")


def test_missing_scale_inv(tmp_path):
    w8, _scale = fp8_tensors("l.q.weight", _weights()["l.q.weight"])
    write_sharded(tmp_path, [w8], 1 << 20)
    _raises(lambda: Checkpoint.open(tmp_path), "l.q.weight", "l.q.weight_scale_inv", "not in the checkpoint")


def test_wrong_scale_grid_shape(tmp_path):
    w8, (scale_name, _) = fp8_tensors("l.kv_a.weight", _weights()["l.kv_a.weight"])
    write_sharded(tmp_path, [w8, (scale_name, torch.ones(4, 2))], 1 << 20)   # [576, 200] needs [5, 2]
    e = _raises(lambda: Checkpoint.open(tmp_path), "l.kv_a.weight_scale_inv", "[4, 2]", "[5, 2]")
    assert e.tensor == "l.kv_a.weight_scale_inv" and e.file.name.startswith("model-00001")


def test_scale_on_a_bf16_weight(tmp_path):
    write_sharded(tmp_path, {"a.weight": torch.ones(4, 4, dtype=torch.bfloat16),
                             "a.weight_scale_inv": torch.ones(1, 1)}, 1 << 20)
    _raises(lambda: Checkpoint.open(tmp_path), "'a.weight'", "BF16", "a.weight_scale_inv")


def test_expect_shape_mismatch(tmp_path):
    folder, _ = _sharded(tmp_path)
    with Checkpoint.open(folder) as ckpt:
        e = _raises(lambda: ckpt.get("l.kv_a.weight", expect_shape=(512, 200)), "l.kv_a.weight",
                    "[576, 200]", "[512, 200]", "config.json does not match the weights")
        assert e.file == ckpt.file_of("l.kv_a.weight") and e.file.name in str(e)


def test_unknown_name_and_wrong_kind(tmp_path):
    folder, _ = _sharded(tmp_path)
    with Checkpoint.open(folder) as ckpt:
        _raises(lambda: ckpt.get("model.norm.weigth"), "'model.norm.weigth'", "did you mean 'model.norm.weight'")
        _raises(lambda: ckpt.shape("x"), "'x'", str(folder))
        _raises(lambda: ckpt.get_fp8("model.norm.weight"), "model.norm.weight", "BF16", "use get()")
        with pytest.raises(TypeError, match="floating torch dtype"):
            ckpt.get("model.norm.weight", torch.int32)
    with pytest.raises(ValueError, match="closed"):
        ckpt.get("model.norm.weight")


def test_open_reads_no_tensor_data(tmp_path):
    # Damaging tensor bytes (not the header) must not fail open(): headers only are read up front.
    folder, paths = _sharded(tmp_path)
    with open(paths[0], "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\x7f" * 16)
    with Checkpoint.open(folder) as ckpt:
        assert "l.kv_a.weight" in ckpt.names
