"""device_expert (packed bytes to the device, decoded there) equals the store's numpy reference bit for bit."""
import numpy as np
import pytest
import torch

from cpu_experts.measure import random_store
from hybrid.runtime.expert_copy import device_expert

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt, hidden, inter", [("int4", 256, 96), ("fp8", 200, 72), ("fp8", 256, 128),
                                                ("bf16", 64, 32)])
def test_device_expert_matches_the_reference(device, fmt, hidden, inter):
    store = random_store(fmt, 3, np.random.default_rng(7), hidden, inter)
    for e in range(3):
        ref = store.dequantize(e)
        got = device_expert(store, e, torch.device(device), torch.float32)
        for r, g in zip(ref, got):
            assert g.device.type == device and g.dtype == torch.float32
            np.testing.assert_array_equal(g.cpu().numpy(), r)      # bit for bit, NaN-free random codes


def test_device_expert_owns_its_memory_and_casts():
    store = random_store("bf16", 2, np.random.default_rng(0), 64, 32)
    gate, _, _ = device_expert(store, 0, torch.device("cpu"), torch.bfloat16)
    before = gate.clone()
    store.section(0, "gate")[...] = 0                     # the store changes; the resident copy must not
    assert gate.dtype == torch.bfloat16 and torch.equal(gate, before)
