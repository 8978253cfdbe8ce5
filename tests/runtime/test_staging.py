"""The device<->host hand-off of the CPU experts (hybrid/runtime/staging.py): one packed copy each way, exact,
with double-buffered results; on CUDA the same code runs with pinned buffers (tests/runtime/test_cuda.py covers the
engine there)."""
import numpy as np
import torch

import hybrid
from hybrid.runtime.experts import CpuExperts
from hybrid.runtime.staging import HostStaging


def test_packed_round_trip_is_exact_and_results_do_not_alias():
    st = HostStaging(torch.device("cpu"), packed=True)
    g = torch.Generator().manual_seed(0)
    h, ids, w = torch.randn(5, 64, generator=g), torch.randint(0, 383, (5, 8), generator=g), torch.rand(5, 8)
    hn, idn, wn = st.to_host(h, ids, w)
    assert np.array_equal(hn, h.numpy()) and np.array_equal(idn, ids.numpy()) and np.array_equal(wn, w.numpy())
    assert idn.dtype == np.int64
    a, b = np.full((5, 64), 1.0, np.float32), np.full((3, 64), 2.0, np.float32)
    ya, yb = st.to_device(a), st.to_device(b)         # two buffers in turn: the first result is not overwritten
    assert float(ya.sum()) == 5 * 64 and float(yb.sum()) == 2 * 3 * 64
    assert st.to_host(h[:2], ids[:2], w[:2])[0].shape == (2, 64)    # smaller calls reuse the buffers


def test_the_engine_through_the_packed_hand_off_gives_the_same_logits(tiny_models):
    model = tiny_models("k2", "fp8")
    eng = hybrid.load(model, device="cpu", experts="fp8")
    want = eng.forward([5, 17, 300, 42, 7])
    backend = eng.experts
    assert isinstance(backend, CpuExperts)
    backend._staging = HostStaging(torch.device("cpu"), packed=True)
    assert torch.equal(eng.forward([5, 17, 300, 42, 7]), want)
