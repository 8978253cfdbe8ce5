"""Expert copies and packed decoding (hybrid/runtime/expert_copy.py) equal the store's numpy reference bit for
bit: each decoder (torch, what CUDA runs; Numba, what the CPU stand-in runs), each format, float32 and bfloat16."""
import numpy as np
import pytest
import torch

from cpu_experts.pool import RowPool
from hybrid.core.placement import packed_expert_bytes
from hybrid.runtime.expert_copy import DECODERS, DecodeBuffer, ExpertCopier, PackedExpert, device_expert
from quant.formats import f32_to_bf16_bits
from quant.layout import MATRICES, make_layout
from quant.store import LayerStore, StoreSpec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [("int4", 256, 96, 32), ("int4", 256, 128, 64), ("fp8", 200, 72, 32), ("fp8", 256, 128, 32),
          ("bf16", 64, 32, 32)]


def _store(fmt: str, hidden: int, inter: int, group: int = 32, n: int = 3, seed: int = 7) -> LayerStore:
    """Random codes (every INT4 nibble, every non-NaN FP8 byte) and a different random scale per group/block."""
    rng = np.random.default_rng(seed)
    lay = make_layout(fmt, hidden, inter, group)
    buf = np.frombuffer(rng.bytes(n * lay.stride), np.uint8).copy()
    store = LayerStore(StoreSpec(fmt, hidden, inter, group), n, buf)
    for e in range(n):
        for m in MATRICES:
            codes = store.section(e, m)
            if fmt == "fp8":
                codes &= np.uint8(0xF7)                                  # never 0x7F / 0xFF (NaN)
                s = store.section(e, m + "_scale")
                s[...] = rng.uniform(1e-4, 1e-1, s.shape).astype(np.float32)
            elif fmt == "int4":
                s = store.section(e, m + "_scale")
                s[...] = f32_to_bf16_bits(rng.uniform(1e-3, 1.0, s.shape).astype(np.float32))
            else:                                                        # finite bf16 values
                codes[...] = (codes & np.uint16(0x807F)) | np.uint16(0x3C00)
    return store


def _reference(store, e, dtype) -> list[torch.Tensor]:
    return [torch.from_numpy(w).to(dtype) for w in store.dequantize(e)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt, hidden, inter, group", SHAPES)
def test_device_expert_matches_the_reference(device, fmt, hidden, inter, group):
    store = _store(fmt, hidden, inter, group)
    for e in range(3):
        got = device_expert(store, e, torch.device(device), torch.float32)
        for r, g in zip(store.dequantize(e), got):
            assert g.device.type == device and g.dtype == torch.float32
            np.testing.assert_array_equal(g.cpu().numpy(), r)      # bit for bit, NaN-free random codes


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt, hidden, inter, group", SHAPES)
def test_each_decoder_is_exact_in_each_dtype(decoder, dtype, fmt, hidden, inter, group):
    # bfloat16: the reference's float32 weight rounded once (the scale products need rounding here)
    store = _store(fmt, hidden, inter, group)
    p = ExpertCopier(torch.device("cpu")).packed(store, 1)
    for m, ref in zip(MATRICES, _reference(store, 1, dtype)):
        out = torch.full(ref.shape, float("nan"), dtype=dtype)
        DECODERS[decoder](p, m, out, RowPool(3) if decoder == "numba" else None)   # uneven row ranges
        assert torch.equal(out, ref), (decoder, m)


def test_packed_copy_is_the_stored_slice_and_owns_its_memory():
    store = _store("int4", 256, 96)
    p = ExpertCopier(torch.device("cpu")).packed(store, 2)
    assert p.nbytes == packed_expert_bytes("int4", 256, 96) <= store.stride
    assert p.nbytes - store.expert_nbytes() < 64 * 6                   # only the 64-byte section alignment
    np.testing.assert_array_equal(p.sections["up_scale"].numpy().view(np.uint16), store.section(2, "up_scale"))
    before = p.blob.clone()
    store.expert_bytes(2)[...] = 0                                      # the store changes; the copy must not
    assert torch.equal(p.blob, before)


def test_decode_buffer_is_reused_and_rewritten():
    store = _store("fp8", 256, 128)
    copier = ExpertCopier(torch.device("cpu"))
    buf = DecodeBuffer(store.spec, torch.device("cpu"), torch.float32)
    assert buf.nbytes == 3 * 256 * 128 * 4
    first = buf.weights(copier.packed(store, 0))
    second = buf.weights(copier.packed(store, 1))
    assert all(a is b for a, b in zip(first, second))                  # the same memory, no allocation per use
    for got, ref in zip(second, _reference(store, 1, torch.float32)):
        assert torch.equal(got, ref)


def test_device_expert_owns_its_memory_and_casts():
    store = _store("bf16", 64, 32, n=2)
    gate, _, _ = device_expert(store, 0, torch.device("cpu"), torch.bfloat16)
    before = gate.clone()
    store.section(0, "gate")[...] = 0                     # the store changes; the resident copy must not
    assert gate.dtype == torch.bfloat16 and torch.equal(gate, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_reuse_pinned_slots_without_overwriting_a_copy_in_flight():
    store = _store("int4", 512, 256, n=8)
    copier = ExpertCopier(torch.device("cuda"))
    packed = [copier.packed(store, e) for e in range(8)]       # no sync between copies: slots are reused
    assert sum(s is not None for s in copier._slots) == ExpertCopier.SLOTS
    assert all(s.is_pinned() for s in copier._slots)
    buf = DecodeBuffer(store.spec, torch.device("cuda"), torch.bfloat16)
    for e, p in enumerate(packed):
        assert torch.equal(p.blob.cpu(), torch.from_numpy(np.array(store.expert_bytes(e)[:p.nbytes])))
        for got, ref in zip(buf.weights(p), _reference(store, e, torch.bfloat16)):
            assert torch.equal(got.cpu(), ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_copies_to_two_devices_run_on_their_own_streams():
    store = _store("fp8", 256, 128, n=6)
    copiers = [ExpertCopier(torch.device(f"cuda:{i}")) for i in range(2)]
    assert copiers[0].stream != copiers[1].stream
    got = [(e, copiers[e % 2].packed(store, e)) for e in range(6)]   # alternating: both links busy at once
    for e, p in got:
        assert p.blob.device.index == e % 2
        assert torch.equal(p.blob.cpu(), torch.from_numpy(np.array(store.expert_bytes(e)[:p.nbytes])))


def test_packed_expert_views_are_typed():
    store = _store("fp8", 256, 128)
    n = packed_expert_bytes("fp8", 256, 128)
    p = PackedExpert.of(store.spec, torch.from_numpy(np.array(store.expert_bytes(0)[:n])))
    assert p.sections["gate"].dtype == torch.uint8 and p.sections["gate"].shape == (128, 256)
    assert p.sections["down_scale"].dtype == torch.float32 and p.sections["down_scale"].shape == (2, 1)
